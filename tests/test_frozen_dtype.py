"""``frozen_dtype``: the frozen weights read from the base file are stored in 16 bit while fitting (as
diffusers' ``weight_dtype``), trained ones stay fp32; the forward and the sampling path run under
autocast; exports and checkpoints carry the base file's exact fp32 frozen weights, never the 16-bit copies."""
from __future__ import annotations

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from core.weights import load_checkpoint, load_state_dict
from ldm.callbacks.export import ExportOnTrainEnd
from ldm.lora_export import merged_state_dict
from ldm.txt2img import sampling_mode, txt2img
from tests.main_helpers import base_checkpoint
from tests.test_dreambooth import CLASS, INSTANCE, part
from tests.test_lean import dreambooth_from

pytestmark = pytest.mark.filterwarnings("ignore")
LORA = {"rank": 2, "alpha": 2, "unet_targets": ["to_q", "to_k", "to_v", "to_out.0"], "text_encoder": False}


def fit(model, folder, precision: str = "bf16-mixed", callbacks=(), steps: int = 2, ckpt_path=None) -> pl.Trainer:
    batches = [{"instance": part(1, INSTANCE, i), "class": part(1, CLASS, 9 + i)} for i in range(steps)]
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision=precision, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=folder, callbacks=list(callbacks))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two bf16-mixed steps of the tiny LoRA DreamBooth with frozen_dtype=bf16 from a base file, exported."""
    tmp = tmp_path_factory.mktemp("frozen")
    base = base_checkpoint(tmp / "base.ckpt", seed=1)
    _, model = dreambooth_from(base, frozen_dtype="bf16", lora=LORA, train_text_encoder=False, use_ema=False)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = fit(model, tmp, callbacks=[ExportOnTrainEnd(logdir=str(tmp))])
    trainer.save_checkpoint(tmp / "lean.ckpt")
    return {"tmp": tmp, "base": load_checkpoint(base)["state_dict"], "model": model, "start": start,
            "base_path": base}


def test_frozen_weights_are_bf16_while_fitting_and_the_adapters_fp32_and_trained(run):
    model, start = run["model"], run["start"]
    params = dict(model.named_parameters())
    frozen = {k for k, p in params.items() if not p.requires_grad}
    assert frozen and set(model.cast_keys) == frozen
    assert all(params[k].dtype == torch.bfloat16 for k in frozen)
    assert any(k.startswith("model.diffusion_model.") and k.endswith("to_q.weight") for k in frozen)
    trained = [k for k, p in params.items() if p.requires_grad]
    assert trained and all(params[k].dtype == torch.float32 for k in trained)
    assert any(not torch.equal(params[k], start[k]) for k in trained)


def test_export_holds_the_base_files_exact_frozen_weights_and_fp32_trained_ones(run):
    model, base = run["model"], run["base"]
    exported = load_state_dict(run["tmp"] / "export" / "model.safetensors")
    adapters = {k: v.detach() for k, v in model.state_dict().items() if "lora_" in k}
    expected = merged_state_dict({**base, **adapters}, model.lora.scale_alpha)  # fp32 base + fp32 delta
    assert exported and all(v.dtype == torch.float32 for v in exported.values())
    assert all(torch.equal(exported[k], expected[k]) for k in exported)
    rounded = [k for k in exported if k in model.cast_keys and not torch.equal(base[k].bfloat16().float(), base[k])]
    assert rounded  # the test can tell: those weights would differ had the 16-bit copies been exported
    lean = load_checkpoint(run["tmp"] / "lean.ckpt")
    assert not set(model.cast_keys) & set(lean["state_dict"])  # checkpoints leave them out (core.lean)
    assert all(v.dtype == torch.float32 for v in lean["state_dict"].values() if v.is_floating_point())


def test_a_lean_checkpoint_resumes_with_the_frozen_weights_cast_again(run):
    _, model = dreambooth_from(run["base_path"], frozen_dtype="bf16", lora=LORA, train_text_encoder=False,
                               use_ema=False)
    fit(model, run["tmp"] / "resumed", steps=3, ckpt_path=run["tmp"] / "lean.ckpt")
    assert model.global_step == 3 and set(model.cast_keys) == set(run["model"].cast_keys)
    params = dict(model.named_parameters())
    assert all(params[k].dtype == torch.bfloat16 for k in model.cast_keys)
    assert all(torch.equal(params[k], run["base"][k].bfloat16()) for k in model.cast_keys)


def test_a_model_with_bf16_frozen_weights_samples_on_cpu_close_to_fp32(run):
    model = run["model"]
    with sampling_mode(model):
        got = txt2img(model, [INSTANCE], [0], 32, 32, steps=2, scale=1.0).astype(np.int16)
    exact = dreambooth_from(None, lora=LORA, train_text_encoder=False, use_ema=False)[1]
    exact.load_state_dict(model.exact_state_dict())
    with sampling_mode(exact):
        want = txt2img(exact, [INSTANCE], [0], 32, 32, steps=2, scale=1.0).astype(np.int16)
    assert got.shape == want.shape == (1, 32, 32, 3)
    assert np.abs(got - want).mean() < 8 and got.std() > 1


def test_unet_only_casts_the_vae_and_the_text_encoder_and_keeps_the_unet_fp32(tmp_path):
    _, model = dreambooth_from(base_checkpoint(tmp_path / "base.ckpt"), frozen_dtype="fp16",
                               train_text_encoder=False, use_ema=False)
    model.cast_frozen()
    assert {p.dtype for p in model.first_stage_model.parameters()} == {torch.float16}
    assert {p.dtype for p in model.cond_stage_model.parameters()} == {torch.float16}
    assert {p.dtype for p in model.model.parameters()} == {torch.float32}


def test_without_a_base_file_nothing_is_cast():
    _, model = dreambooth_from(None, frozen_dtype="bf16", train_text_encoder=False, use_ema=False)
    assert model.cast_frozen() == [] and {p.dtype for p in model.parameters()} == {torch.float32}


def test_bad_frozen_dtype_and_full_precision_trainer_are_refused(tmp_path):
    with pytest.raises(ValueError, match="frozen_dtype='fp8': expected one of fp32, bf16, fp16"):
        dreambooth_from(None, frozen_dtype="fp8")
    _, model = dreambooth_from(base_checkpoint(tmp_path / "base.ckpt"), frozen_dtype="bf16", use_ema=False)
    with pytest.raises(ValueError, match="frozen_dtype=bf16 needs mixed precision.*precision=32"):
        fit(model, tmp_path, precision="32-true")
