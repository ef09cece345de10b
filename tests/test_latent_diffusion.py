"""LatentDiffusion: sd-v1 keys, checkpoint formats, DDIM+CFG against diffusers, training step."""
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm)
from omegaconf import OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel

from core.weights import CheckpointError, save_checkpoint
from ldm.loading import load_model
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from core.config import instantiate_from_config
from tests._util import rel_err
from tests.sd_fixtures import FULL_CONFIG, plain, tiny_config, tiny_model

SCHEDULE_KEYS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2"}
# openai/clip-vit-large-patch14's text tower (transformers 5 keys carry no "text_model." prefix)
VIT_L14_TEXT = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
PROMPTS = ["a photo of a sks dog", "a red circle on a white background"]


def _diffusers_parts(model, cfg):
    sd = model.state_dict()
    original = plain(cfg)
    unet_cfg = create_unet_diffusers_config_from_ldm(original, sd)
    unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, unet_cfg), strict=True)
    vae_cfg = create_vae_diffusers_config_from_ldm(original, sd)
    vae = DiffusersVAE(**vae_cfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, vae_cfg), strict=True)
    return unet.eval(), vae.eval()


def test_state_dict_has_the_sd_v1_layout():
    keys = tiny_model().state_dict().keys()
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"} | SCHEDULE_KEYS
    assert any(k.startswith("model.diffusion_model.input_blocks.0.0.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.0.") for k in keys)
    with_ema = tiny_model(**{"model.params.use_ema": True}).state_dict()
    assert {"model_ema.decay", "model_ema.num_updates", "model_ema.diffusion_modelinput_blocks00weight"} <= set(with_ema)


def test_the_schedule_is_in_the_state_dict_but_stays_on_the_host_in_float32(tmp_path):
    """The 12 schedule tables are sd-v1 keys (saved, loaded strictly, the file's values kept) but not
    module buffers: .half() / .to() leave them float32 on the host (diffusers keeps its scheduler's
    arrays off the device too) and DDP has nothing to broadcast for them."""
    model = tiny_model()
    assert not SCHEDULE_KEYS & {name for name, _ in model.named_buffers()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    changed = dict(sd, alphas_cumprod=sd["alphas_cumprod"] * 0.5)
    model.half()
    assert all(getattr(model, k).dtype == torch.float32 and getattr(model, k).device.type == "cpu" for k in SCHEDULE_KEYS)
    model.float()
    model.load_state_dict(changed)
    assert torch.equal(model.alphas_cumprod, sd["alphas_cumprod"] * 0.5)
    assert torch.equal(model.state_dict()["alphas_cumprod"], sd["alphas_cumprod"] * 0.5)
    missing = {k: v for k, v in sd.items() if k != "posterior_variance"}
    torch.save({"state_dict": missing}, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"missing keys 1 \(posterior_variance\)"):
        load_model(tiny_config(), tmp_path / "missing.ckpt")
    wrong = dict(sd, betas=torch.zeros(10))
    save_checkpoint(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointError, match=r"wrong shapes 1 \(betas \(10,\)"):
        load_model(tiny_config(), tmp_path / "wrong.safetensors")


def test_full_size_v1_inference_config_matches_diffusers_and_transformers_strictly():
    cfg = OmegaConf.load(FULL_CONFIG)
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model)
        sd = model.state_dict()
        unet_cfg = create_unet_diffusers_config_from_ldm(plain(cfg), sd)
        vae_cfg = create_vae_diffusers_config_from_ldm(plain(cfg), sd)
        ref = {"unet": UNet2DConditionModel(**unet_cfg).state_dict(), "vae": DiffusersVAE(**vae_cfg).state_dict(),
               "text": CLIPTextModel(VIT_L14_TEXT).state_dict()}
    ours = {"unet": convert_ldm_unet_checkpoint(sd, unet_cfg), "vae": convert_ldm_vae_checkpoint(sd, vae_cfg),
            "text": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(sd).items()}}
    for part in ours:
        ref_shapes = {k: tuple(v.shape) for k, v in ref[part].items() if not k.endswith("position_ids")}
        our_shapes = {k: tuple(v.shape) for k, v in ours[part].items() if not k.endswith("position_ids")}
        assert our_shapes == ref_shapes, part
    assert unet_cfg["block_out_channels"] == (320, 640, 1280, 1280) or list(unet_cfg["block_out_channels"]) == [320, 640, 1280, 1280]
    assert SCHEDULE_KEYS <= set(sd)
    n_unet = sum(p.numel() for p in model.model.parameters())
    assert 859_000_000 < n_unet < 860_000_000


@pytest.mark.parametrize("fmt", ["ckpt", "ckpt-ema", "safetensors"])
def test_sd_v1_files_load_through_the_config_with_identical_outputs(tmp_path, fmt):
    src = tiny_model(seed=1, **({"model.params.use_ema": True} if fmt == "ckpt-ema" else {}))
    sd = src.state_dict()
    if fmt == "safetensors":
        path = save_checkpoint(sd, tmp_path / "model.safetensors")
    else:  # the released .ckpt files also carry the CLIP position_ids buffer
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": sd, "global_step": 470000, "epoch": 5}, path)
    cfg = tiny_config()  # use_ema False: a file with model_ema.* must load too
    loaded = load_model(cfg, path)
    ref = tiny_model(seed=1)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        c = loaded.get_learned_conditioning(PROMPTS)
        torch.testing.assert_close(c, ref.get_learned_conditioning(PROMPTS), rtol=0, atol=0)
        torch.testing.assert_close(loaded.apply_model(x, t, c), ref.apply_model(x, t, c), rtol=0, atol=0)
        torch.testing.assert_close(loaded.decode_first_stage(x), ref.decode_first_stage(x), rtol=0, atol=0)


def test_ema_model_loads_an_ema_less_file_and_ema_scope_swaps(tmp_path):
    src = tiny_model(seed=2)
    path = save_checkpoint(src.state_dict(), tmp_path / "plain.safetensors")
    model = load_model(tiny_config(**{"model.params.use_ema": True}), path)
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = model.apply_model(x, t, c)
        with model.ema_scope():
            torch.testing.assert_close(model.apply_model(x, t, c), before)
        for b in model.model_ema.buffers():
            if b.is_floating_point() and b.ndim > 0:
                b.mul_(0.5)
        with model.ema_scope():
            assert rel_err(model.apply_model(x, t, c), before) > 1e-3
        torch.testing.assert_close(model.apply_model(x, t, c), before)


def test_ill_fitting_checkpoints_are_named(tmp_path):
    sd = tiny_model().state_dict()
    missing = dict(sd)
    del missing["model.diffusion_model.out.2.weight"]
    torch.save({"state_dict": missing}, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"missing.ckpt: .*missing keys 1 \(model.diffusion_model.out.2.weight\)"):
        load_model(tiny_config(), tmp_path / "missing.ckpt")
    extra = dict(sd, **{"model.diffusion_model.bogus.weight": torch.zeros(1)})
    save_checkpoint(extra, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys 1 \(model.diffusion_model.bogus.weight\)"):
        load_model(tiny_config(), tmp_path / "extra.safetensors")
    wrong = dict(sd, **{"model.diffusion_model.out.2.weight": torch.zeros(1, 2, 3, 3)})
    save_checkpoint(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointError, match=r"wrong shapes 1 \(.*out.2.weight \(1, 2, 3, 3\)"):
        load_model(tiny_config(), tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointError, match="nothere.ckpt: checkpoint file not found"):
        load_model(tiny_config(), tmp_path / "nothere.ckpt")


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_cfg_equals_diffusers_pipeline_loop(eta):
    cfg = tiny_config()
    model = tiny_model(seed=3)
    unet, vae = _diffusers_parts(model, cfg)
    steps, scale = 8, 6.0
    with torch.no_grad():
        c = model.get_learned_conditioning(PROMPTS)
        uc = model.get_learned_conditioning([""] * 2)
        x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        ours, _ = DDIMSampler(model).sample(S=steps, batch_size=2, shape=(4, 16, 16), conditioning=c,
                                            unconditional_guidance_scale=scale, unconditional_conditioning=uc,
                                            eta=eta, x_T=x_T, generator=torch.Generator().manual_seed(5),
                                            verbose=False)
        sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="leading")
        sched.set_timesteps(steps)
        gen, x = torch.Generator().manual_seed(5), x_T
        for t in sched.timesteps:
            e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
            noise = torch.randn(x.shape, generator=gen) if eta > 0 else None
            x = sched.step(e_u + scale * (e_c - e_u), t, x, eta=eta, variance_noise=noise).prev_sample
        assert rel_err(ours, x) < 1e-4
        img_ours = model.decode_first_stage(ours)
        img_ref = vae.decode(x / 0.18215).sample
        assert rel_err(img_ours, img_ref) < 1e-4


def test_plms_sampler_runs_and_refuses_eta():
    model = tiny_model(seed=4)
    c = model.get_learned_conditioning(PROMPTS[:1])
    with torch.no_grad():
        z, inter = PLMSSampler(model).sample(S=5, batch_size=1, shape=(4, 16, 16), conditioning=c, verbose=False)
    assert z.shape == (1, 4, 16, 16) and torch.isfinite(z).all()
    with pytest.raises(ValueError, match="eta must be 0"):
        PLMSSampler(model).sample(S=5, batch_size=1, shape=(4, 16, 16), conditioning=c, eta=0.5, verbose=False)


def test_training_step_trains_the_unet_only_and_matches_the_eps_loss():
    model = tiny_model(seed=5, **{"model.params.use_ema": True}).train()
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "caption": PROMPTS}
    torch.manual_seed(11)
    loss = model.shared_step(batch)[0]
    loss.backward()
    assert all(p.grad is not None for p in model.model.parameters())
    assert all(p.grad is None for p in model.first_stage_model.parameters())
    assert all(p.grad is None for p in model.cond_stage_model.parameters())
    assert not model.first_stage_model.training and not model.cond_stage_model.training
    # the same loss by hand: z = s * posterior sample, x_t = q(z, t, eps), mse(eps_theta, eps)
    model.zero_grad()
    torch.manual_seed(11)
    x = batch["image"].permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        z = 0.18215 * model.first_stage_model.encode(x).sample()
        t = torch.randint(0, 1000, (2,))
        noise = torch.randn_like(z)
        ac = model.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        x_t = ac.sqrt() * z + (1 - ac).sqrt() * noise
        eps = model.apply_model(x_t, t, model.get_learned_conditioning(PROMPTS))
        assert rel_err(((eps - noise) ** 2).mean(), loss) < 1e-5
    opt = model.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.model.parameters()}
    before = model.model_ema.state_dict()["num_updates"].item()
    model.on_train_batch_end(None, batch, 0)
    assert model.model_ema.state_dict()["num_updates"].item() == before + 1


def test_trainable_text_encoder_is_optimised():
    model = tiny_model(**{"model.params.cond_stage_trainable": True})
    opt = model.configure_optimizers()
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in model.cond_stage_model.parameters()} <= ids
    assert not ({id(p) for p in model.first_stage_model.parameters()} & ids)


def test_scale_by_std_is_measured_once_and_kept_from_a_checkpoint(tmp_path):
    """LDM paper sec. 4.3: scale_factor = 1 / std(z) of the first batch; a model loaded from a checkpoint
    keeps the stored value (a fine-tuning run must not re-measure it on its own few images)."""
    from safetensors.torch import save_file

    model = tiny_model(seed=3, **{"model.params.scale_by_std": True}).train()
    images = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.manual_seed(0)
    z = model.first_stage_model.encode(images.permute(0, 3, 1, 2)).sample()
    torch.manual_seed(0)
    model.on_train_batch_start({"image": images}, 0)
    assert torch.allclose(model.scale_factor, 1 / z.flatten().std(), rtol=1e-5)
    assert model.scale_factor.item() != 1.0 and "scale_factor" in model.state_dict()
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = tiny_model(seed=4, **{"model.params.scale_by_std": True, "model.params.ckpt_path": str(path)}).train()
    loaded.on_train_batch_start({"image": images * 0.1}, 0)
    assert loaded.scale_factor.item() == model.scale_factor.item()


def test_compile_option_compiles_the_unet_in_place_with_the_same_keys():
    eager, compiled = tiny_model(), tiny_model(**{"model.params.compile": True})
    assert compiled.model.diffusion_model._compiled_call_impl is not None  # built lazily, at the first call
    assert eager.model.diffusion_model._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_channels_last_option_gives_the_same_eps_gradients_and_checkpoint(tmp_path):
    plain_model, nhwc = tiny_model(seed=3), tiny_model(seed=3, **{"model.params.channels_last": True})
    convs = [p for p in nhwc.model.diffusion_model.parameters() if p.ndim == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(p.shape[-1] > 1 for p in convs) and not any(p.is_contiguous() for p in convs if p.shape[-1] > 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t, c = torch.tensor([3, 700]), plain_model.get_learned_conditioning(["a red square", "a dog"]).detach()
    outs = []
    for model in (plain_model, nhwc):
        eps = model.apply_model(x, t, c)
        eps.square().mean().backward()
        outs.append((eps.detach(), {k: p.grad for k, p in model.model.diffusion_model.named_parameters()}))
    (eps_a, grads_a), (eps_b, grads_b) = outs
    assert rel_err(eps_b, eps_a) < 1e-5
    flat = [torch.cat([g[k].flatten() for k in grads_a]) for g in (grads_a, grads_b)]  # some are ~0 (pre-norm biases)
    assert (flat[1] - flat[0]).norm() / flat[0].norm() < 1e-5
    assert all(grads_b[k].stride() == p.stride() for k, p in nhwc.model.diffusion_model.named_parameters())
    path = save_checkpoint({"state_dict": nhwc.state_dict()}, tmp_path / "nhwc.ckpt")
    back = instantiate_from_config(tiny_config(**{"model.params.ckpt_path": str(path)}).model)
    assert list(back.state_dict()) == list(plain_model.state_dict())
    assert all(torch.equal(back.state_dict()[k], v) for k, v in nhwc.state_dict().items())
