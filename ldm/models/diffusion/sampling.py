"""Samplers as pure functions over an eps-prediction function ``eps_fn(x, t) -> eps``.

DDIM: Song et al. 2021 (arXiv 2010.02502), eq. 12. PLMS: Liu et al. 2022 (arXiv 2202.09778), the
pseudo linear multi-step method as used by the CompVis repositories. Notation: a_t = abar_t
(``alphas_cumprod`` at the sampled timesteps), a_prev = abar at the next (less noisy) timestep.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


def ddim_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
    """The CompVis "uniform" spacing, k * (T // S) + 1 for k < S (diffusers: "leading", steps_offset 1).

    CompVis writes range(0, T, T // S) + 1, the same when S divides T; otherwise it makes S + 1 steps
    (and indexes past the schedule for e.g. S = 3). Here it is always exactly S steps, as diffusers.
    """
    if not 0 < steps <= num_train_timesteps:
        raise ValueError(f"number of sampling steps must be in [1, {num_train_timesteps}], got {steps}")
    return np.arange(steps) * (num_train_timesteps // steps) + 1


def ddim_coefficients(alphas_cumprod: torch.Tensor, timesteps: np.ndarray,
                      eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_t, a_prev, sigma_t) per sampled step, in increasing-t order; the first a_prev is abar_0.

    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))   (DDIM eq. 16)
    """
    ac = alphas_cumprod.detach().cpu().numpy()
    a = ac[timesteps]
    a_prev = np.asarray([ac[0]] + ac[timesteps[:-1]].tolist())
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    as_t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return as_t(a), as_t(a_prev), as_t(sigma)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor,
              sigma: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update (eq. 12): returns (x_prev, predicted x_0)."""
    pred_x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()                 # (B, C, H, W)
    dir_xt = (1 - a_prev - sigma ** 2).sqrt() * eps                       # direction pointing to x_t
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def _batched_t(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)


def _coefficients_like(x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: np.ndarray,
                       eta: float) -> tuple[torch.Tensor, ...]:
    """``ddim_coefficients`` moved once to x's device and dtype (no host-device copy per step)."""
    return tuple(v.to(device=x.device, dtype=x.dtype) for v in ddim_coefficients(alphas_cumprod, timesteps, eta))


def sample_ddim(eps_fn: EpsFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: np.ndarray,
                eta: float = 0.0, generator: torch.Generator | None = None, callback: Callback | None = None,
                log_every_t: int = 100, progress: bool = False) -> tuple[torch.Tensor, dict[str, list]]:
    """Run DDIM from x_T over ``timesteps`` (increasing order given, traversed backwards).

    Returns the final sample and intermediates {'x_inter': [...], 'pred_x0': [...]}.
    """
    a, a_prev, sigma = _coefficients_like(x, alphas_cumprod, timesteps, eta)
    inter = {"x_inter": [x], "pred_x0": [x]}
    steps = len(timesteps)
    for i in tqdm(range(steps), desc="DDIM", disable=not progress):
        index = steps - 1 - i
        eps = eps_fn(x, _batched_t(timesteps[index], x))
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x, pred_x0 = ddim_step(x, eps, a[index], a_prev[index], sigma[index], noise)
        _record(inter, index, steps, log_every_t, x, pred_x0)
        if callback is not None:
            callback(i, x, pred_x0)
    return x, inter


def adams_bashforth(eps: torch.Tensor, old: list[torch.Tensor]) -> torch.Tensor:
    """Linear multi-step combination of the current and up to three earlier eps (PLMS eq. 12)."""
    if len(old) == 1:
        return (3 * eps - old[-1]) / 2
    if len(old) == 2:
        return (23 * eps - 16 * old[-1] + 5 * old[-2]) / 12
    return (55 * eps - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24


def sample_plms(eps_fn: EpsFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: np.ndarray,
                callback: Callback | None = None, log_every_t: int = 100,
                progress: bool = False) -> tuple[torch.Tensor, dict[str, list]]:
    """PLMS from x_T. The first step has no history and uses the pseudo improved Euler method:
    eps' = (eps(x_t, t) + eps(x_{t-1}^{Euler}, t_next)) / 2."""
    a, a_prev, sigma = _coefficients_like(x, alphas_cumprod, timesteps, 0.0)
    inter = {"x_inter": [x], "pred_x0": [x]}
    steps = len(timesteps)
    old: list[torch.Tensor] = []
    for i in tqdm(range(steps), desc="PLMS", disable=not progress):
        index = steps - 1 - i
        coeffs = (a[index], a_prev[index], sigma[index])
        eps = eps_fn(x, _batched_t(timesteps[index], x))
        if old:
            eps_prime = adams_bashforth(eps, old)
        else:
            x_euler, _ = ddim_step(x, eps, *coeffs)
            t_next = timesteps[max(index - 1, 0)]
            eps_prime = (eps + eps_fn(x_euler, _batched_t(t_next, x))) / 2
        x, pred_x0 = ddim_step(x, eps_prime, *coeffs)
        old = (old + [eps])[-3:]
        _record(inter, index, steps, log_every_t, x, pred_x0)
        if callback is not None:
            callback(i, x, pred_x0)
    return x, inter


def _record(inter: dict[str, list], index: int, steps: int, every: int, x: torch.Tensor,
            pred_x0: torch.Tensor) -> None:
    if index % every == 0 or index == steps - 1:
        inter["x_inter"].append(x)
        inter["pred_x0"].append(pred_x0)
