"""Loss options of the one eps loss (``DDPM.p_losses``): Min-SNR-gamma weighting (Hang et al. 2023)
against diffusers' ``compute_snr`` and by hand, kohya-ss's noise offset by hand, and both off by
default: the loss and the RNG draws of today, bit for bit."""
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from ldm.models.diffusion.schedule import offset_noise, snr
from tests._util import rel_err
from tests.test_dreambooth import dreambooth, eps_losses_by_hand, pair

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def inputs(seed: int = 0):
    """z (2, 4, 16, 16), text context (2, 77, 32), t on both sides of gamma = 5, eps (2, 4, 16, 16)."""
    gen = torch.Generator().manual_seed(seed)
    z, c = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 32, generator=gen)
    return z, c, torch.tensor([10, 900]), torch.randn(2, 4, 16, 16, generator=gen)


def test_snr_equals_diffusers_compute_snr_on_the_sd_v1_schedule():
    model = dreambooth()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    t = torch.arange(1000)
    assert rel_err(snr(model.alphas_cumprod, t), compute_snr(scheduler, t)) < 1e-4


def test_min_snr_gamma_weights_each_sample_by_min_snr_gamma_over_snr():
    model = dreambooth(snr_gamma=5.0).eval()
    z, c, t, noise = inputs()
    with torch.no_grad():
        loss, logs = model.p_losses(z, c, t, noise)
        abar = model.alphas_cumprod[t].double()
        x_t = abar.sqrt().reshape(-1, 1, 1, 1) * z + (1 - abar).sqrt().reshape(-1, 1, 1, 1) * noise
        mse = ((model.apply_model(x_t.float(), t, c) - noise) ** 2).mean(dim=(1, 2, 3)).double()
    ratio = abar / (1 - abar)
    weight = torch.minimum(ratio, torch.full_like(ratio, 5.0)) / ratio
    assert weight[0] < 0.1 and weight[1] == 1.0  # one sample weighted down, one not
    assert rel_err(loss, (weight * mse).mean()) < 1e-5
    assert rel_err(logs["val/loss_simple"], mse.mean()) < 1e-5 and rel_err(loss, mse.mean()) > 0.1


def test_noise_offset_adds_one_normal_per_sample_and_channel_after_the_noise():
    z = torch.zeros(3, 4, 8, 8)
    torch.manual_seed(11)
    got = offset_noise(z, 0.05)
    gen = torch.Generator().manual_seed(11)
    want = torch.randn(3, 4, 8, 8, generator=gen) + 0.05 * torch.randn(3, 4, 1, 1, generator=gen)
    assert torch.equal(got, want)
    torch.manual_seed(11)
    assert torch.equal(offset_noise(z), torch.randn(3, 4, 8, 8, generator=gen.manual_seed(11)))


def test_noise_offset_is_the_eps_of_the_loss():
    model = dreambooth(noise_offset=0.1).eval()
    z, c, t, _ = inputs()
    with torch.no_grad():
        torch.manual_seed(2)
        loss, _ = model.p_losses(z, c, t)
        torch.manual_seed(2)
        noise = offset_noise(z, 0.1)
        assert torch.equal(loss, model.p_losses(z, c, t, noise)[0])
        torch.manual_seed(2)
        assert not torch.equal(loss, dreambooth().eval().p_losses(z, c, t)[0])


def test_both_options_weight_the_instance_and_the_class_terms():
    batch, losses = pair(2), {}
    for name, params in {"off": {}, "snr": {"snr_gamma": 0.5}, "offset": {"noise_offset": 0.5}}.items():
        model = dreambooth(prior_loss_weight=1.0, **params)
        for half in ("instance", "class"):
            torch.manual_seed(3)
            with torch.no_grad():
                (losses[name, half],) = model.denoising_losses(batch[half])
    for half in ("instance", "class"):
        assert rel_err(losses["snr", half], losses["off", half]) > 1e-2
        assert rel_err(losses["offset", half], losses["off", half]) > 1e-2


def test_defaults_leave_the_loss_and_the_draws_bit_identical():
    """Defaults: the loss is the plain eps loss of each half, bit for bit, computed by hand with the same
    draws (posterior sample, t, eps per half, instance first) and one concatenated UNet forward."""
    model, batch = dreambooth(prior_loss_weight=0.5), pair(2)
    assert model.snr_gamma is None and model.noise_offset == 0.0
    torch.manual_seed(3)
    loss = model.training_step(batch, 0)
    after = torch.rand(1)
    torch.manual_seed(3)
    with torch.no_grad():
        l_instance, l_class = eps_losses_by_hand(model, batch["instance"], batch["class"])
    assert torch.equal(loss, l_instance + 0.5 * l_class) and torch.equal(torch.rand(1), after)


@pytest.mark.parametrize("params", [{"snr_gamma": 0.0}, {"noise_offset": -0.1}])
def test_bad_values_are_refused(params):
    with pytest.raises(ValueError, match="snr_gamma=.*noise_offset="):
        dreambooth(**params)
