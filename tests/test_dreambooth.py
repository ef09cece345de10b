"""DreamBooth system: the prior-preservation loss by hand, freezing, optimizer groups, caches,
learning, Lightning with mixed precision and the sampling callbacks, and the configs."""
import warnings

import lightning.pytorch as pl
import pytest
import torch
from einops import rearrange
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ldm.callbacks.image_logger import ImageLogger
import ldm.models.diffusion.dreambooth as dreambooth_module
from ldm.models.diffusion.dreambooth import PROMPT_CACHE
from ldm.callbacks.class_images import ClassImageSampler
from core.config import instantiate_from_config
from tests._util import randomize_, rel_err
from tests.sd_fixtures import FULL_CONFIG, ROOT, plain

TINY_DB = ROOT / "configs" / "toy" / "dreambooth-tiny.yaml"
FULL_DB = ROOT / "configs" / "dreambooth.yaml"
INSTANCE, CLASS = "a photo of sks dog", "a photo of dog"

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def dreambooth(seed: int = 0, **params):
    cfg = OmegaConf.load(TINY_DB)
    for k, v in params.items():
        OmegaConf.update(cfg, f"model.params.{k}", v)
    model = instantiate_from_config(cfg.model)
    randomize_(model, seed=seed, scale=0.1)
    if model.use_ema:
        model.model_ema.reset_from(model.model)
    return model.train()


def part(n: int, caption: str, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 32, 32, 3, generator=gen) * 2 - 1, "caption": [caption] * n}


def pair(n: int = 1) -> dict:
    return {"instance": part(n, INSTANCE, 1), "class": part(n, CLASS, 2)}


def eps_loss_by_hand(model, half: dict) -> torch.Tensor:
    """||eps - eps_theta(sqrt(abar_t) z + sqrt(1 - abar_t) eps, t, c)||^2 with the documented draw order."""
    x = rearrange(half["image"], "b h w c -> b c h w").contiguous()
    z = 0.18215 * model.first_stage_model.encode(x).sample()
    t = torch.randint(0, 1000, (x.shape[0],))
    noise = torch.randn_like(z)
    abar = model.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * z + (1 - abar).sqrt() * noise
    eps = model.model.diffusion_model(x_t, t, context=model.cond_stage_model.encode(half["caption"]))
    return ((eps - noise) ** 2).mean()


def eps_losses_by_hand(model, *halves: dict) -> list[torch.Tensor]:
    """The eps loss of each half, the draws in the documented order (posterior sample, t, eps per half,
    the halves in order) and one UNet forward on the concatenated halves."""
    zs, ts, noises = [], [], []
    for half in halves:
        x = rearrange(half["image"], "b h w c -> b c h w").contiguous()
        zs.append(0.18215 * model.first_stage_model.encode(x).sample())
        ts.append(torch.randint(0, 1000, (x.shape[0],)))
        noises.append(torch.randn_like(zs[-1]))
    z, t, noise = torch.cat(zs), torch.cat(ts), torch.cat(noises)
    abar = model.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * z + (1 - abar).sqrt() * noise
    c = model.cond_stage_model.encode([p for half in halves for p in half["caption"]])
    eps = model.model.diffusion_model(x_t, t, context=c)
    sizes = [len(half["caption"]) for half in halves]
    return [((e - n) ** 2).mean(dim=(1, 2, 3)).mean() for e, n in zip(eps.split(sizes), noise.split(sizes))]


def test_one_unet_forward_per_step_on_both_halves_concatenated():
    model, batch = dreambooth(), pair(2)
    calls = []
    hook = model.model.diffusion_model.register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
    try:
        model.training_step(batch, 0)
        model.training_step({"instance": batch["instance"]}, 0)
    finally:
        hook.remove()
    assert calls == [4, 2]


def test_separate_forwards_give_the_same_losses_and_gradients_in_two_unet_calls():
    model, batch = dreambooth(), pair(2)
    results = {}
    for separate in (False, True):
        model.separate_forwards = separate
        calls = []
        hook = model.model.diffusion_model.register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
        try:
            model.zero_grad(set_to_none=True)
            torch.manual_seed(7)
            losses = model.denoising_losses(batch["instance"], batch["class"])
            (losses[0] + losses[1]).backward()
        finally:
            hook.remove()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[separate] = (calls, torch.stack(losses).detach(), grads)
    assert results[False][0] == [4] and results[True][0] == [2, 2]
    assert rel_err(results[True][1], results[False][1]) < 1e-5
    assert rel_err(results[True][1][0], results[True][1][1]) > 1e-2  # the halves differ: a swap would show
    assert rel_err(results[True][2], results[False][2]) < 1e-5


def unet_grad(model, batch: dict, seed: int = 5) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model.training_step(batch, 0).backward()
    return torch.cat([p.grad.flatten() for p in model.model.parameters()])


def test_loss_is_instance_plus_weighted_class_loss_computed_by_hand():
    model = dreambooth(prior_loss_weight=0.5)
    batch = pair(2)
    torch.manual_seed(3)
    loss = model.training_step(batch, 0)
    torch.manual_seed(3)
    with torch.no_grad():
        l_instance = eps_loss_by_hand(model, batch["instance"])
        l_class = eps_loss_by_hand(model, batch["class"])
    assert rel_err(loss, l_instance + 0.5 * l_class) < 1e-5
    assert rel_err(l_instance, l_class) > 1e-2  # the halves differ: a swap or a wrong weight would show
    torch.manual_seed(3)
    only_instance = model.training_step({"instance": batch["instance"]}, 0)
    assert rel_err(only_instance, l_instance) < 1e-5


def test_prior_loss_weight_scales_the_class_gradient():
    model = dreambooth()
    batch = pair()
    grads = {}
    for w in (0.0, 1.0):
        model.prior_loss_weight = w
        grads[w] = unet_grad(model, batch)
    assert rel_err(grads[0.0], unet_grad(model, {"instance": batch["instance"]})) < 1e-5
    assert (grads[1.0] - grads[0.0]).norm() > 1e-2 * grads[1.0].norm()


def test_gradient_checkpointing_from_the_unet_config_gives_the_same_gradients():
    batch = pair()
    plain_grad = unet_grad(dreambooth(), batch)
    checkpointed = dreambooth(**{"unet_config.params.use_checkpoint": True})
    assert checkpointed.model.diffusion_model.input_blocks[1][0].use_checkpoint
    assert rel_err(unet_grad(checkpointed, batch), plain_grad) < 1e-5


def test_frozen_text_encoder_gets_no_grads_and_encodes_each_prompt_once(monkeypatch):
    model = dreambooth(train_text_encoder=False)
    text = model.cond_stage_model
    assert not text.training and not any(p.requires_grad for p in text.parameters())
    encode, encoded = text.encode, []
    monkeypatch.setattr(text, "encode", lambda prompts: encoded.extend(prompts) or encode(prompts))
    batch = pair()
    for step in range(2):
        model.training_step(batch, step).backward()
    assert sorted(encoded) == sorted([INSTANCE, CLASS])
    assert all(p.grad is None for p in text.parameters())
    assert all(p.grad is not None for p in model.model.parameters())
    with torch.no_grad():
        fresh = encode(batch["instance"]["caption"])
    assert rel_err(model.conditioning(batch["instance"]["caption"]), fresh) < 1e-5
    groups = model.configure_optimizers().param_groups
    assert [g["name"] for g in groups] == ["unet"]
    # the device keeps the batch it stacked (the same tensor next step), not per-prompt copies beside it
    both = [INSTANCE, CLASS]
    assert model.conditioning(both) is model.conditioning(list(both))
    assert all(c.shape[0] == len(key) for key, c in model._prompt_cache.items())
    for k in range(PROMPT_CACHE + 3):  # bounded: the least recently used lists go
        model.conditioning([f"a photo of {k} dog"])
    assert len(model._prompt_cache) == PROMPT_CACHE and tuple(both) not in model._prompt_cache


def test_trained_text_encoder_encodes_each_distinct_prompt_of_a_step_once(monkeypatch):
    """Rows that share a prompt share its encoding: same context, same gradients, half the encoder's
    work for DreamBooth's batches; an encoder with active dropout encodes every row."""
    model, twin = dreambooth(), dreambooth()
    text = model.cond_stage_model
    encode, encoded = text.encode, []
    monkeypatch.setattr(text, "encode", lambda prompts: encoded.append(list(prompts)) or encode(prompts))
    prompts = [INSTANCE, INSTANCE, CLASS, CLASS]
    c, full = model.conditioning(prompts), twin.get_learned_conditioning(prompts)
    assert encoded == [[INSTANCE, CLASS]] and c.shape == full.shape and rel_err(c, full) < 1e-6
    weights = torch.randn_like(c)
    (c * weights).sum().backward()
    (full * weights).sum().backward()
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (text, twin.cond_stage_model)]
    assert rel_err(*grads) < 1e-5  # all of them as one vector (some are ~0, rounding only)
    encoded.clear()
    model.conditioning([INSTANCE, CLASS])  # nothing repeated: one encoding of the rows as they are
    assert encoded == [[INSTANCE, CLASS]]
    dropped = dreambooth(lora={"rank": 2, "dropout": 0.5, "text_encoder": True})
    assert dropped.text_dropout()
    encoded.clear()
    encode = dropped.cond_stage_model.encode
    monkeypatch.setattr(dropped.cond_stage_model, "encode",
                        lambda prompts: encoded.append(list(prompts)) or encode(prompts))
    dropped.conditioning(prompts)
    assert encoded == [prompts]


def test_text_encoder_has_its_own_learning_rate_and_the_vae_is_never_trained():
    model = dreambooth(text_encoder_lr=5e-6)
    model.learning_rate = 1e-6
    groups = {g["name"]: g for g in model.configure_optimizers().param_groups}
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(groups["unet"]["params"]) == ids(model.model.parameters()) and groups["unet"]["lr"] == 1e-6
    text = model.cond_stage_model
    assert ids(groups["text_encoder"]["params"]) == ids(text.parameters()) and groups["text_encoder"]["lr"] == 5e-6
    assert text.training and all(p.requires_grad for p in text.parameters())
    vae = model.first_stage_model
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    model.training_step(pair(1), 0).backward()
    assert all(p.grad is None for p in vae.parameters())
    assert all(p.grad is not None for p in text.parameters())
    model.text_encoder_lr = None
    assert [g["lr"] for g in model.configure_optimizers().param_groups] == [1e-6, 1e-6]
    with pytest.raises(ValueError, match="text_encoder_lr is set but train_text_encoder is false"):
        dreambooth(train_text_encoder=False, text_encoder_lr=1e-5)


def count_encodes(model, monkeypatch) -> list[int]:
    """The batch size of each call of the model's VAE encoder from now on, as the list returned fills."""
    vae = model.first_stage_model
    encode, encoded = vae.encode, []
    monkeypatch.setattr(vae, "encode", lambda x: encoded.append(x.shape[0]) or encode(x))
    return encoded


def test_cached_latents_equal_fresh_ones_and_each_distinct_image_is_encoded_once(monkeypatch):
    model = dreambooth(cache_latents=True)
    encoded = count_encodes(model, monkeypatch)
    batch = pair(2)
    batch["class"]["image"][1] = batch["instance"]["image"][0]  # 3 distinct images
    losses = []
    for _ in range(2):
        torch.manual_seed(7)
        losses.append(model.training_step(batch, 0))
    assert encoded == [1, 1, 1] and losses[0] == losses[1]
    model.cache_latents = False
    torch.manual_seed(7)
    assert rel_err(model.training_step(batch, 0), losses[0]) < 1e-5
    model.cache_latents, encoded[:] = True, []
    flipped = {"instance": dict(batch["instance"], image=batch["instance"]["image"].flip(2))}
    model.training_step(flipped, 0)
    assert encoded == [1, 1]  # a flipped image is another image


def test_the_data_sets_digests_key_the_latent_cache_without_hashing_the_batch(monkeypatch):
    model = dreambooth(cache_latents=True)
    encoded = count_encodes(model, monkeypatch)
    batch = pair(2)
    torch.manual_seed(7)
    hashed = model.training_step(batch, 0)  # no digests in the batch: the model hashes the images
    model.on_fit_start()  # empties the caches
    encoded[:] = []
    monkeypatch.setattr(dreambooth_module, "image_digest", lambda x: pytest.fail("hashed a batch image"))
    keyed = {half: dict(batch[half], image_digest=[f"{half}{i}" for i in range(2)]) for half in batch}
    keyed["class"]["image_digest"] = ["class0", "instance1"]  # the digests decide: 3 entries
    torch.manual_seed(7)
    loss = model.training_step(keyed, 0)
    assert encoded == [1, 1, 1]
    model.on_fit_start()
    keyed["class"]["image_digest"] = ["class0", "class1"]
    torch.manual_seed(7)
    assert torch.equal(model.training_step(keyed, 0), hashed) and encoded == [1, 1, 1, 1, 1, 1, 1]
    keyed["class"]["image_digest"] = ["class0"]
    with pytest.raises(ValueError, match="image_digest: 1 digests for a batch of 2 images"):
        model.training_step(keyed, 0)
    assert loss.isfinite()


def test_a_few_steps_reduce_the_instance_loss():
    model = dreambooth(seed=1, train_text_encoder=False)
    model.learning_rate = 3e-3
    batch = {"instance": part(1, INSTANCE, 3)}

    def loss_at_fixed_draws() -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return model.training_step(batch, 0).item()

    losses = [loss_at_fixed_draws()]
    opt = model.configure_optimizers()
    for step in range(4):
        opt.zero_grad()
        torch.manual_seed(0)
        model.training_step(batch, step).backward()
        opt.step()
        losses.append(loss_at_fixed_draws())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses


def test_trains_through_lightning_in_bf16_mixed_with_the_sampling_callbacks(tmp_path):
    model = dreambooth(seed=2)
    model.learning_rate = 1e-4
    start = [p.detach().clone() for p in model.model.parameters()]
    loader = DataLoader([{"instance": part(1, INSTANCE, i), "class": part(1, CLASS, 9 + i)} for i in range(2)],
                        batch_size=None)
    callbacks = [ClassImageSampler(str(tmp_path / "class"), "dog", num_class_images=2, ddim_steps=1),
                 ImageLogger(every_n_steps=2, prompts=[INSTANCE], ddim_steps=1, n_per_prompt=1,
                             logdir=str(tmp_path / "run"), log_at_end=False)]
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, precision="bf16-mixed", callbacks=callbacks,
                         logger=TensorBoardLogger(str(tmp_path / "run"), name="tb"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train_dataloaders=loader)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/loss_instance", "train/loss_class"):
        assert torch.isfinite(metrics[key])
    assert rel_err(metrics["train/loss"], metrics["train/loss_instance"] + metrics["train/loss_class"]) < 1e-5
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(start, model.model.parameters()))
    assert sorted(p.name for p in (tmp_path / "class").iterdir()) == ["class_00000.png", "class_00001.png"]
    assert (tmp_path / "run" / "images" / "step-000002" / "grid.png").is_file()
    assert list((tmp_path / "run" / "tb").rglob("events.out.tfevents.*"))


def test_configs_have_the_dreambooth_defaults_and_the_same_structure():
    full, tiny = OmegaConf.load(FULL_DB), OmegaConf.load(TINY_DB)

    def keys(cfg, prefix=""):
        if not isinstance(cfg, dict):
            return {prefix}
        return set().union(*[keys(v, f"{prefix}.{k}") for k, v in cfg.items()])

    skip = ("model.params.unet_config", "model.params.first_stage_config", "model.params.cond_stage_config",
            "model.params.num_timesteps_cond", "model.params.log_every_t", "lightning.trainer")
    strip = lambda ks: {k for k in ks if not k.lstrip(".").startswith(skip)}  # noqa: E731
    assert strip(keys(OmegaConf.to_container(full))) == strip(keys(OmegaConf.to_container(tiny)))
    v1 = OmegaConf.load(FULL_CONFIG).model.params
    for name in ("unet_config", "first_stage_config", "linear_start", "linear_end",
                 "timesteps", "scale_factor", "image_size", "channels", "conditioning_key"):
        assert full.model.params[name] == v1[name], name
    # the text encoder of sd-v1, with gradient checkpointing for training
    text = OmegaConf.to_container(full.model.params.cond_stage_config)
    assert text.pop("params") == {"use_checkpoint": True} and text == OmegaConf.to_container(v1.cond_stage_config)
    assert full.model.target == "ldm.models.diffusion.dreambooth.DreamBooth"
    assert full.model.base_learning_rate == 1e-6 and full.model.params.prior_loss_weight == 1.0
    assert full.model.params.train_text_encoder and full.model.params.unet_config.params.use_checkpoint
    assert full.data.params.batch_size == 1 and full.data.params.train.params.flip_p == 0.5
    assert full.data.params.train.params.resolution == 512 and full.dreambooth.num_class_images == 100
    assert full.lightning.trainer.max_steps == 800 and full.lightning.trainer.precision == "16-mixed"
    assert full.lightning.checkpoint.every_n_steps == 500
    full.dreambooth.class_word = "dog"
    prompts = plain(full)["lightning"]["callbacks"]["image_logger"]["params"]["prompts"]
    assert prompts[:2] == ["a photo of sks dog", "a photo of a dog"]
    with torch.device("meta"):
        model = instantiate_from_config(full.model)
    assert type(model).__name__ == "DreamBooth" and not model.use_ema
    assert all(p.requires_grad for p in model.cond_stage_model.parameters())
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())
