"""ldm.compat: CompVis config parameters kept only for compatibility are validated and dropped in one
adapter (``from_config_params``); the constructors take only what the models use."""
import pytest
import torch
from omegaconf import OmegaConf

from core.config import instantiate_from_config
from ldm import compat
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion.ddpm import DDPM, LatentDiffusion
from ldm.models.diffusion.dreambooth import DreamBooth
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from tests.sd_fixtures import FULL_CONFIG, plain, tiny_config

# every compatibility-only parameter of CompVis's LatentDiffusion / DDPM, at CompVis values
COMPVIS_LATENT = {"log_every_t": 200, "clip_denoised": True, "monitor": "val/loss_simple_ema", "logvar_init": 0.0,
                  "loss_type": "l2", "parameterization": "eps", "original_elbo_weight": 0.0, "learn_logvar": False,
                  "use_positional_encodings": False, "load_only_unet": False, "conditioning_key": "crossattn",
                  "num_timesteps_cond": 1, "cond_stage_forward": None, "concat_mode": True}
COMPVIS_UNET = {"image_size": 32, "num_heads_upsample": -1, "use_new_attention_order": False, "num_classes": None,
                "n_embed": None, "dims": 2, "use_fp16": False, "use_scale_shift_norm": False,
                "resblock_updown": False, "conv_resample": True, "use_spatial_transformer": True}


def compvis_params() -> dict:
    """The tiny LatentDiffusion's params with every CompVis compatibility key added."""
    params = plain(tiny_config()).get("model")["params"]
    params["unet_config"]["params"].update(COMPVIS_UNET)
    params["first_stage_config"]["params"]["monitor"] = "val/rec_loss"
    return {**params, **COMPVIS_LATENT}


def test_a_compvis_style_params_dict_builds_with_the_same_keys():
    model = instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                     "params": compvis_params()})
    reference = instantiate_from_config(tiny_config().model)
    assert type(model) is LatentDiffusion
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
    db = instantiate_from_config({"target": "ldm.models.diffusion.dreambooth.DreamBooth",
                                  "params": {**compvis_params(), "cond_stage_trainable": True}})
    assert type(db) is DreamBooth and db.train_text_encoder


def test_v1_inference_builds_through_the_adapter():
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(FULL_CONFIG).model)
    assert type(model) is LatentDiffusion and model.image_size == 64 and not model.use_ema


@pytest.mark.parametrize("key, value", [("loss_type", "l1"), ("parameterization", "x0"), ("learn_logvar", True),
                                        ("original_elbo_weight", 0.5), ("use_positional_encodings", True),
                                        ("load_only_unet", True), ("conditioning_key", "concat"),
                                        ("num_timesteps_cond", 2), ("cond_stage_forward", "encode")])
def test_a_non_default_unsupported_value_raises_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"LatentDiffusion: {key}={value!r} is not implemented"):
        LatentDiffusion.from_config_params(**{**compvis_params(), key: value})


@pytest.mark.parametrize("key, value", [("dims", 3), ("use_fp16", True), ("use_spatial_transformer", False)])
def test_a_non_default_unet_option_raises_through_the_system_config(key, value):
    params = compvis_params()
    params["unet_config"]["params"][key] = value
    with pytest.raises(ValueError, match=f"UNetModel: {key}={value!r} is not implemented"):
        LatentDiffusion.from_config_params(**params)


def test_dreambooth_cond_stage_trainable_must_agree_with_train_text_encoder():
    with pytest.raises(ValueError, match="cond_stage_trainable=False contradicts train_text_encoder=True"):
        DreamBooth.from_config_params(**{**compvis_params(), "cond_stage_trainable": False})


def test_the_plain_constructors_reject_the_compat_only_keys():
    params = plain(tiny_config()).get("model")["params"]
    unet = dict(params["unet_config"]["params"])
    for key in COMPVIS_UNET:
        unet.pop(key, None)
    UNetModel(**unet)  # the constructor without them builds
    for key, value in COMPVIS_UNET.items():
        with pytest.raises(TypeError, match=key):
            UNetModel(**{**unet, key: value})
    for key, value in COMPVIS_LATENT.items():
        with pytest.raises(TypeError, match=key):
            LatentDiffusion(**{**compat.adapt("LatentDiffusion", params), key: value})
    for key in ("log_every_t", "monitor", "conditioning_key"):
        with pytest.raises(TypeError, match=key):
            DDPM(unet_config=params["unet_config"], **{key: COMPVIS_LATENT[key]})
    vae = params["first_stage_config"]["params"]
    with pytest.raises(TypeError, match="lossconfig"):
        AutoencoderKL(**vae)
    AutoencoderKL.from_config_params(**vae, monitor="val/rec_loss")
