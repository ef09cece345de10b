"""The sd-v1 UNet against diffusers' UNet2DConditionModel, loaded through diffusers' own converter
(built from CompVis-style parameters, as configs give them: `UNetModel.from_config_params`)."""
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)
from omegaconf import OmegaConf

from ldm.modules.attention import BasicTransformerBlock
from ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel, head_split
from tests._util import randomize_, rel_err

PREFIX = "model.diffusion_model."
V1_YAML = Path(__file__).resolve().parents[1] / "configs" / "v1-inference.yaml"
SD_V1_UNET_PARAMS = 859_520_964

TINY = dict(
    image_size=8,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[1, 2],
    num_res_blocks=1,
    channel_mult=[1, 2],
    num_heads=2,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=32,
    legacy=False,
)


def ldm_yaml(unet_params: dict) -> dict:
    """The CompVis-style config diffusers derives its UNet config from.

    diffusers also reads first_stage_config.params.ddconfig.ch_mult (for sample_size only).
    """
    vae = {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}
    return {"model": {"params": {"unet_config": {"params": unet_params}, "first_stage_config": vae}}}


def prefixed(state_dict: dict) -> dict:
    return {PREFIX + k: v for k, v in state_dict.items()}


def diffusers_twin(ours: UNetModel, unet_params: dict, head_override=None) -> UNet2DConditionModel:
    """diffusers' UNet built from its own config mapping, loaded strictly with its own converter."""
    ckpt = prefixed(ours.state_dict())
    config = create_unet_diffusers_config_from_ldm(ldm_yaml(unet_params), ckpt)
    if head_override is not None:
        config["attention_head_dim"] = head_override
    converted = convert_ldm_unet_checkpoint(ckpt, config)
    assert len(converted) == len(ckpt), "diffusers' converter did not map every key one-to-one"
    ref = UNet2DConditionModel(**config).eval()
    ref.load_state_dict(converted, strict=True)
    return ref


def tiny_inputs(batch: int = 2, size: int = 8, context_dim: int = 32, tokens: int = 5):
    x = torch.randn(batch, 4, size, size)
    context = torch.randn(batch, tokens, context_dim)
    return x, context


# (our params, diffusers attention_head_dim override, timesteps)
CASES = {
    # sd-v1 head rule: legacy=False, fixed head count; int timesteps.
    "sd_v1_heads": (TINY, None, torch.tensor([999, 17])),
    # legacy head rule, 4 heads, 2 ResBlocks, depth-2 transformers, attention on the inner
    # levels only (plain Down/UpBlock2D at the outer one); float timesteps.
    "legacy_depth2": (
        {
            **TINY,
            "legacy": True,
            "num_heads": 4,
            "num_res_blocks": 2,
            "transformer_depth": 2,
            "channel_mult": [1, 2, 2],
            "attention_resolutions": [2, 4],
        },
        None,
        torch.tensor([3.5, 500.25]),
    ),
    # fixed head width (num_head_channels 16 -> 2 and 4 heads); diffusers' yaml mapping only knows
    # head counts, so the per-block counts are given to it as diffusers maps num_head_channels for SD 2.
    "head_channels": (
        {**{k: v for k, v in TINY.items() if k != "num_heads"}, "num_head_channels": 16},
        [2, 4],
        torch.tensor([0, 250]),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_diffusers(case):
    params, head_override, timesteps = CASES[case]
    ours = randomize_(UNetModel.from_config_params(**params)).eval()
    ref = diffusers_twin(ours, params, head_override)
    size = 16 if len(params["channel_mult"]) > 2 else 8
    x, context = tiny_inputs(size=size)
    with torch.no_grad():
        out = ours(x, timesteps, context)
        expected = ref(x, timesteps, encoder_hidden_states=context).sample
    assert out.shape == x.shape
    assert rel_err(out, expected) <= 1e-5


def test_full_size_keys_and_shapes_match_diffusers():
    yaml = OmegaConf.load(V1_YAML)
    params = OmegaConf.to_container(yaml.model.params.unet_config.params)
    with torch.device("meta"):
        ours = UNetModel.from_config_params(**params)
    ckpt = prefixed(ours.state_dict())
    config = create_unet_diffusers_config_from_ldm(yaml, ckpt)
    converted = convert_ldm_unet_checkpoint(ckpt, config)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert len(converted) == len(ckpt)
    assert sum(p.numel() for p in ours.parameters()) == SD_V1_UNET_PARAMS


def count_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def train_step(model: UNetModel, x, t, context):
    torch.manual_seed(1)
    loss = model(x, t, context).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_same_gradients_and_recomputes():
    params = {**TINY, "dropout": 0.1}
    plain = randomize_(UNetModel.from_config_params(**params)).train()
    ckpt = UNetModel.from_config_params(**params, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    res_calls = count_calls(next(m for m in ckpt.modules() if isinstance(m, ResBlock)).in_layers)
    attn_calls = count_calls(next(m for m in ckpt.modules() if isinstance(m, BasicTransformerBlock)).attn1)
    x, context = tiny_inputs()
    t = torch.tensor([10, 900])
    loss_a, grads_a = train_step(plain, x, t, context)
    loss_b, grads_b = train_step(ckpt, x, t, context)
    assert (len(res_calls), len(attn_calls)) == (2, 2), "blocks were not recomputed in backward"
    assert rel_err(loss_b, loss_a) <= 1e-6
    assert grads_a.keys() == grads_b.keys()
    assert max(rel_err(grads_b[n], grads_a[n]) for n in grads_a) <= 1e-5


def test_bf16_close_to_fp32():
    model = randomize_(UNetModel.from_config_params(**TINY), scale=0.1).eval()
    x, context = tiny_inputs()
    t = torch.tensor([5, 700])
    with torch.no_grad():
        expected = model(x, t, context)
        out = model.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16())
    assert out.dtype == torch.bfloat16
    assert rel_err(out, expected) <= 5e-2


UNSUPPORTED = {
    "num_classes": 10,
    "n_embed": 16,
    "dims": 3,
    "use_fp16": True,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
    "conv_resample": False,
    "use_spatial_transformer": False,
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_options_raise(name):
    with pytest.raises(ValueError, match=f"UNetModel: {name}=.* is not implemented"):
        UNetModel.from_config_params(**{**TINY, name: UNSUPPORTED[name]})


def test_missing_heads_or_context_raise():
    with pytest.raises(ValueError, match="num_heads or num_head_channels"):
        UNetModel.from_config_params(**{**TINY, "num_heads": -1})
    with pytest.raises(ValueError, match="context_dim"):
        UNetModel.from_config_params(**{**TINY, "context_dim": None})


def test_head_split_compvis_rules():
    assert head_split(320, num_heads=8, num_head_channels=-1, legacy=False) == (8, 40)
    assert head_split(1280, num_heads=8, num_head_channels=-1, legacy=True) == (8, 160)
    assert head_split(640, num_heads=8, num_head_channels=64, legacy=False) == (10, 64)
    # legacy differs only when the head width does not divide the channels
    assert head_split(96, num_heads=-1, num_head_channels=64, legacy=False) == (1, 64)
    assert head_split(96, num_heads=-1, num_head_channels=64, legacy=True) == (1, 96)
