"""The forward diffusion process of DDPM (Ho et al. 2020, arXiv 2006.11239): schedules and q(x_t | x_0).

Notation: beta_t the noise variances, alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s
(``alphas_cumprod``). The buffers are computed in float64 and stored in float32, exactly as the
CompVis code does, so the values equal those saved in the released sd-v1 checkpoints. A system keeps
them on the host (``ddpm.DDPM``: state-dict entries, not module buffers): the functions below read
``a[t]`` on the device of ``t``, through a temporary copy of the 1000-entry table.
"""
from __future__ import annotations

import numpy as np
import torch

SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4,
                       linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
    """beta_1..beta_T as float64. sd-v1 uses "linear": linspace(sqrt(0.00085), sqrt(0.012), T) ** 2."""
    if schedule == "linear":
        return np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=np.float64) ** 2
    if schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    if schedule == "cosine":  # Nichol & Dhariwal 2021, eq. 17
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        abar = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
        return np.clip(1 - abar[1:] / abar[:-1], 0, 0.999)
    raise ValueError(f"beta_schedule must be one of {SCHEDULES}, got {schedule!r}")


def schedule_buffers(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, torch.Tensor]:
    """The sd-v1 schedule buffers, by their checkpoint names (float32)."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    # posterior q(x_{t-1} | x_t, x_0) variance (DDPM eq. 7), blended with beta_t by v_posterior
    post_var = (1 - v_posterior) * betas * (1.0 - abar_prev) / (1.0 - abar) + v_posterior * betas
    values = {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
        "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


def extract(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """a[t] reshaped to broadcast over a batch of ``ndim``-dimensional tensors: (B,) -> (B, 1, ..., 1)."""
    return a.to(t.device).gather(0, t.long()).reshape(-1, *([1] * (ndim - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, sqrt_abar: torch.Tensor,
             sqrt_one_minus_abar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps   (DDPM eq. 4)."""
    return (extract(sqrt_abar, t, x0.ndim).to(x0.dtype) * x0
            + extract(sqrt_one_minus_abar, t, x0.ndim).to(x0.dtype) * noise)


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t), the signal-to-noise ratio of x_t (Kingma et al. 2021): (B,)."""
    abar = alphas_cumprod.to(t.device).gather(0, t.long())
    return abar / (1 - abar)


def min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weight of the eps loss, min(SNR(t), gamma) / SNR(t) (Hang et al. 2023,
    arXiv 2303.09556: the x_0 loss weight min(SNR, gamma) over SNR, for eps-prediction): (B,)."""
    ratio = snr(alphas_cumprod, t)
    return ratio.clamp(max=gamma) / ratio


def offset_noise(x: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """eps ~ N(0, I) like ``x``, plus ``offset`` times one N(0, 1) per sample and channel (kohya-ss's
    noise offset): (B, C, H, W). Draws randn_like(x), then (B, C, 1, 1); offset 0 draws only the first."""
    noise = torch.randn_like(x)
    if offset:
        shape = (*x.shape[:2], *([1] * (x.ndim - 2)))
        noise = noise + offset * torch.randn(shape, device=x.device, dtype=x.dtype)
    return noise
