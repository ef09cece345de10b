"""The sd-v1 KL autoencoder against diffusers' AutoencoderKL, loaded through diffusers' own
single-file conversion of CompVis keys; checkpoint loading; the diagonal Gaussian posterior."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders import single_file_utils as sfu
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as DiffusersGaussian
from diffusers.pipelines.stable_diffusion.convert_from_ckpt import create_vae_diffusers_config
from omegaconf import OmegaConf

from core.weights import CheckpointError, save_checkpoint
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.model import AttnBlock, Decoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from core.config import instantiate_from_config
from tests._util import randomize_, rel_err

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "first_stage_model."


def tiny_ddconfig(attn_resolutions: list[int]) -> dict:
    return dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=attn_resolutions, dropout=0.0)


def compvis_config(first_stage_params: dict) -> dict:
    """The part of a CompVis model config that diffusers' converters read."""
    return {"model": {"params": {"scale_factor": 0.18215, "first_stage_config": {
        "target": "ldm.models.autoencoder.AutoencoderKL", "params": first_stage_params}}}}


def rename_level_attention(converted: dict, ldm_state: dict, num_levels: int) -> None:
    """Rename AttnBlocks outside the mid-block, which ``convert_ldm_vae_checkpoint`` leaves untouched.

    The per-tensor renaming (norm -> group_norm, q -> to_q, conv -> linear) is diffusers' own
    ``update_vae_attentions_ldm_to_diffusers``; only the level index is mapped here, as the
    converter does for ResnetBlocks (decoder ``up.{b}`` -> ``up_blocks.{num_levels - 1 - b}``).
    """
    for key in [k for k in converted if re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k)]:
        del converted[key]
        part, level, j = re.match(r"\w+\.(down|up)\.(\d+)\.attn\.(\d+)\.", key).groups()
        new_level = int(level) if part == "down" else num_levels - 1 - int(level)
        mapping = {"old": f"{part}.{level}.attn.{j}", "new": f"{part}_blocks.{new_level}.attentions.{j}"}
        sfu.update_vae_attentions_ldm_to_diffusers([key], converted, ldm_state, mapping)


def to_diffusers(ours: AutoencoderKL, params: dict) -> tuple[dict, dict]:
    """Our state_dict as an sd-v1 checkpoint -> (diffusers state_dict, diffusers config), by diffusers."""
    ckpt = {PREFIX + k: v for k, v in ours.state_dict().items()}
    original = compvis_config(params)
    config = sfu.create_vae_diffusers_config_from_ldm(original, ckpt)
    ddconfig = params["ddconfig"]
    config.update(create_vae_diffusers_config(original, image_size=ddconfig["resolution"]))
    converted = sfu.convert_ldm_vae_checkpoint(ckpt, config)
    rename_level_attention(converted, ours.state_dict(), len(ddconfig["ch_mult"]))
    return converted, config


@pytest.mark.parametrize("attn_resolutions", [[], [16]])
def test_tiny_matches_diffusers(attn_resolutions: list[int]) -> None:
    params = dict(ddconfig=tiny_ddconfig(attn_resolutions), embed_dim=4, lossconfig={"target": "torch.nn.Identity"})
    ours = randomize_(AutoencoderKL.from_config_params(**params)).eval()
    converted, config = to_diffusers(ours, params)
    ref = DiffusersAutoencoderKL(**config).eval()
    ref.load_state_dict(converted, strict=True)
    n_attn = sum(isinstance(m, AttnBlock) for m in ours.modules())
    assert n_attn == 2 + 3 * (len(attn_resolutions) > 0)  # mid-blocks, plus 1 encoder and 2 decoder blocks
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        z = torch.randn(2, 4, 16, 16)
        dec, ref_dec = ours.decode(z), ref.decode(z).sample
    assert post.mean.shape == (2, 4, 16, 16) and dec.shape == (2, 3, 32, 32)
    assert rel_err(post.mean, ref_post.mean) <= 1e-5
    assert rel_err(post.logvar, ref_post.logvar) <= 1e-5
    assert rel_err(dec, ref_dec) <= 1e-5


def test_full_size_keys_match_diffusers() -> None:
    config = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/v1-inference.yaml"))
    first_stage = config["model"]["params"]["first_stage_config"]
    with torch.device("meta"):
        ours = instantiate_from_config(first_stage)
    assert isinstance(ours, AutoencoderKL)
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    converted, diffusers_config = to_diffusers(ours, first_stage["params"])
    assert len(converted) == len(ours.state_dict()) == 248
    with torch.device("meta"):
        ref = DiffusersAutoencoderKL(**diffusers_config)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    ref.load_state_dict(converted, strict=True, assign=True)


def small_autoencoder(**kwargs) -> AutoencoderKL:
    return AutoencoderKL(ddconfig=tiny_ddconfig([]), embed_dim=4, **kwargs)


def test_ckpt_path_round_trip_and_ignore_keys(tmp_path: Path) -> None:
    ours = randomize_(small_autoencoder(), seed=3)
    state = dict(ours.state_dict(), **{"loss.logvar": torch.zeros(())})
    path = save_checkpoint(state, tmp_path / "vae.safetensors")
    loaded = small_autoencoder(ckpt_path=path, ignore_keys=["loss"])
    for k, v in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: .*unexpected keys 1 \(loss\.logvar\)"):
        small_autoencoder(ckpt_path=path)


def test_ckpt_path_missing_key_and_wrong_shape(tmp_path: Path) -> None:
    state = small_autoencoder().state_dict()
    missing = save_checkpoint({k: v for k, v in state.items() if k != "decoder.conv_out.bias"}, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=r"a\.safetensors: .*missing keys 1 \(decoder\.conv_out\.bias\)"):
        small_autoencoder(ckpt_path=missing)
    wrong = save_checkpoint(dict(state, **{"quant_conv.bias": torch.zeros(3)}), tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"b\.safetensors: .*wrong shapes 1 \(quant_conv\.bias \(3,\) \(expected \(8,\)\)\)"):
        small_autoencoder(ckpt_path=wrong)


def test_forward_uses_posterior_sample_or_mode() -> None:
    ours = randomize_(small_autoencoder()).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        rec, post = ours(x, sample_posterior=False)
        assert torch.equal(rec, ours.decode(post.mode()))
        rec, post = ours(x, generator=torch.Generator().manual_seed(5))
        assert torch.equal(rec, ours.decode(post.sample(torch.Generator().manual_seed(5))))


def test_double_z_false_is_refused() -> None:
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(ddconfig=dict(tiny_ddconfig([]), double_z=False), embed_dim=4)


def test_gaussian_matches_diffusers_and_is_seeded() -> None:
    params = torch.randn(2, 8, 3, 3) * 3
    params[0, 4, 0, 0] = -100.0  # clamped to logvar -30
    ours, ref = DiagonalGaussianDistribution(params), DiffusersGaussian(params)
    assert ours.logvar[0, 0, 0, 0] == -30.0
    s1, s2 = ours.sample(torch.Generator().manual_seed(1)), ours.sample(torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, ours.sample(torch.Generator().manual_seed(2)))
    assert rel_err(s1, ref.sample(torch.Generator().manual_seed(1))) <= 1e-6
    other = DiagonalGaussianDistribution(torch.randn(2, 8, 3, 3))
    assert rel_err(ours.kl(), ref.kl()) <= 1e-6
    assert rel_err(ours.kl(other), ref.kl(DiffusersGaussian(other.parameters))) <= 1e-6
    assert rel_err(ours.nll(s1), ref.nll(s1)) <= 1e-6
    assert torch.equal(ours.mode(), params[:, :4])


def test_gaussian_kl_of_standard_normal_is_zero() -> None:
    standard = DiagonalGaussianDistribution(torch.zeros(3, 8, 2, 2))
    assert torch.equal(standard.kl(), torch.zeros(3))
    shifted = DiagonalGaussianDistribution(torch.cat([torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)], 1))
    assert torch.allclose(shifted.kl(), torch.tensor([0.5 * 16]))  # 0.5 * sum(mu^2) over 16 elements
    det = DiagonalGaussianDistribution(torch.randn(3, 8, 2, 2), deterministic=True)
    assert torch.equal(det.sample(), det.mean) and torch.equal(det.kl(), torch.zeros(3))


def test_ddconfig_options_without_diffusers_counterpart() -> None:
    """resamp_with_conv=False (avg-pool / plain nearest), give_pre_end and tanh_out, as CompVis."""
    ddconfig = dict(tiny_ddconfig([]), resamp_with_conv=False)
    ours = randomize_(AutoencoderKL(ddconfig=ddconfig, embed_dim=4))
    assert not [k for k in ours.state_dict() if "sample." in k]
    x = torch.randn(1, 32, 8, 8)
    assert torch.equal(ours.encoder.down[0].downsample(x), torch.nn.functional.avg_pool2d(x, 2))
    assert torch.equal(ours.decoder.up[1].upsample(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        features = Decoder(**dict(ddconfig, give_pre_end=True))(z)
        image = randomize_(Decoder(**dict(ddconfig, tanh_out=True)), scale=2.0)(z)
    assert features.shape == (1, 32, 32, 32)
    assert image.abs().max() <= 1.0 and image.abs().max() > 0.9
