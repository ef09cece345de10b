"""Our DDIM / PLMS sampling functions against diffusers' schedulers configured as CompVis."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from ldm.models.diffusion.guidance import guided_eps_fn
from ldm.models.diffusion.sampling import ddim_timesteps, sample_ddim, sample_plms
from ldm.models.diffusion.schedule import make_beta_schedule, schedule_buffers
from tests._util import rel_err

COMPVIS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               set_alpha_to_one=False, steps_offset=1)


def toy_eps_fn(seed=0):
    """A smooth, non-linear, t-dependent stand-in for a denoiser (B, 4, 8, 8)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 4, generator=g) * 0.5
    b = torch.randn(1, 4, 1, 1, generator=g)

    def eps_fn(x, t):
        s = (t.float() / 1000.0).reshape(-1, 1, 1, 1)
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, x)) * (1 + s) + b * s
    return eps_fn


def test_schedule_matches_diffusers_scaled_linear():
    ours = schedule_buffers(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    ref = DDIMScheduler(**COMPVIS)
    assert rel_err(ours["alphas_cumprod"], ref.alphas_cumprod) < 1e-5
    assert rel_err(ours["betas"], ref.betas) < 1e-5


def test_timesteps_are_compvis_leading_plus_one():
    ref = DDIMScheduler(**COMPVIS, timestep_spacing="leading")
    for steps in (1, 3, 7, 10, 50, 250, 999):
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(ddim_timesteps(1000, steps)[::-1], ref.timesteps.numpy())
    with pytest.raises(ValueError, match="sampling steps"):
        ddim_timesteps(1000, 0)


@pytest.mark.parametrize("steps,eta", [(10, 0.0), (25, 0.0), (10, 0.7), (50, 1.0)])
def test_ddim_equals_diffusers(steps, eta):
    sched = DDIMScheduler(**COMPVIS, clip_sample=False, timestep_spacing="leading")
    sched.set_timesteps(steps)
    eps_fn = toy_eps_fn()
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours, inter = sample_ddim(eps_fn, x_T, sched.alphas_cumprod, ddim_timesteps(1000, steps), eta=eta,
                              generator=torch.Generator().manual_seed(7))
    noise_gen = torch.Generator().manual_seed(7)
    x = x_T
    for t in sched.timesteps:
        noise = torch.randn(x.shape, generator=noise_gen) if eta > 0 else None
        x = sched.step(eps_fn(x, t.repeat(2)), t, x, eta=eta, variance_noise=noise).prev_sample
    assert rel_err(ours, x) < 1e-5
    assert len(inter["x_inter"]) >= 2


def test_plms_equals_diffusers_pndm():
    steps = 20
    sched = PNDMScheduler(**COMPVIS, skip_prk_steps=True)
    sched.set_timesteps(steps)
    eps_fn = toy_eps_fn(3)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    calls = []

    def counted(x, t):
        calls.append(int(t[0]))
        return eps_fn(x, t)
    ours, _ = sample_plms(counted, x_T, sched.alphas_cumprod, ddim_timesteps(1000, steps))
    x = x_T
    for t in sched.timesteps:
        x = sched.step(eps_fn(x, t.repeat(2)), t, x).prev_sample
    # PNDM evaluates the model at the same S + 1 points (the first timestep's neighbour twice)
    assert sorted(calls) == sorted(sched.timesteps.tolist())
    assert rel_err(ours, x) < 1e-5


class _CountingModel:
    def __init__(self):
        self.batches = []

    def apply_model(self, x, t, c):
        self.batches.append(x.shape[0])
        return x * c.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + t.float().reshape(-1, 1, 1, 1) / 1000


def test_cfg_is_one_batched_forward_and_the_guidance_formula():
    model = _CountingModel()
    x, t = torch.randn(3, 4, 8, 8), torch.full((3,), 501)
    cond, uncond = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    eps = guided_eps_fn(model, cond, uncond, 7.5)(x, t)
    assert model.batches == [6]
    e_c, e_u = model.apply_model(x, t, cond), model.apply_model(x, t, uncond)
    torch.testing.assert_close(eps, e_u + 7.5 * (e_c - e_u))
    model.batches.clear()
    guided_eps_fn(model, cond, uncond, 1.0)(x, t)
    assert model.batches == [3]


def test_sampler_projects_the_context_once_and_samples_the_same():
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.modules.attention import BasicTransformerBlock
    from tests.sd_fixtures import tiny_model

    model = tiny_model()
    cross = [m.attn2 for m in model.modules() if isinstance(m, BasicTransformerBlock)]
    calls = []
    for m in cross:
        m.to_k.register_forward_hook(lambda *_: calls.append(1))
    gen = torch.Generator().manual_seed(4)
    x_T = torch.randn(2, 4, 8, 8, generator=gen)
    c, uc = torch.randn(2, 77, 32, generator=gen), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        plain, _ = sample_ddim(guided_eps_fn(model, c, uc, 5.0), x_T, model.alphas_cumprod, ddim_timesteps(1000, 3))
    assert len(calls) == 3 * len(cross) > 0  # without the memo: once a step
    calls.clear()
    ours, _ = DDIMSampler(model).sample(S=3, batch_size=2, shape=(4, 8, 8), conditioning=c,
                                        unconditional_guidance_scale=5.0, unconditional_conditioning=uc,
                                        x_T=x_T, verbose=False)
    assert len(calls) == len(cross)  # the sampler: once for all steps
    assert torch.equal(ours, plain)
    assert all(m.context_memo is None for m in cross)  # off again after sampling
