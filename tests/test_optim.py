"""core.optim's optimizer choice (``model.params.optimizer``): 8-bit AdamW trains the tiny DreamBooth
on CPU, the default is the AdamW (or Adam) of before bit for bit, and a missing bitsandbytes is one
line before any work starts."""
from __future__ import annotations

import importlib.util

import bitsandbytes
import pytest
import torch

from core import trainer as main
from core.optim import build_optimizer, check_optimizer
from ldm.models.autoencoder_training import AutoencoderKLTraining
from tests.main_helpers import make_images, base_checkpoint, DREAMBOOTH_TINY
from tests.test_dreambooth import CLASS, INSTANCE, dreambooth, part

DDCONFIG = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn) -> None:
    loss_fn(model).backward()
    optimizer.step()
    optimizer.zero_grad()


def dreambooth_loss(model) -> torch.Tensor:
    torch.manual_seed(0)
    return model.training_step({"instance": part(1, INSTANCE, 1), "class": part(1, CLASS, 2)}, 0)


def test_adamw8bit_trains_the_tiny_dreambooth_on_cpu():
    model = dreambooth(optimizer="adamw8bit")
    model.learning_rate = 1e-3
    optimizer = model.configure_optimizers()
    assert type(optimizer) is bitsandbytes.optim.AdamW8bit
    assert [g["name"] for g in optimizer.param_groups] == ["unet", "text_encoder"]
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    one_step(model, optimizer, dreambooth_loss)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    assert any(k.startswith("model.diffusion_model.") for k in changed)
    assert any(k.startswith("cond_stage_model.") for k in changed)
    assert not any(k.startswith("first_stage_model.") for k in changed)
    moments = [s["state1"] for s in optimizer.state.values() if s["state1"].dtype == torch.uint8]
    assert moments  # the large tensors' moments are 8-bit


def test_default_is_torch_adamw_bit_for_bit():
    ours, reference = dreambooth(seed=3), dreambooth(seed=3)
    ours.learning_rate = reference.learning_rate = 1e-3
    optimizer = ours.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW
    plain = torch.optim.AdamW(reference.param_groups(), lr=1e-3)  # what DDPM built before core.optim
    for _ in range(2):
        one_step(ours, optimizer, dreambooth_loss)
        one_step(reference, plain, dreambooth_loss)
    for (k, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k


def test_autoencoder_default_is_adam_of_compvis_bit_for_bit():
    torch.manual_seed(0)
    ours = AutoencoderKLTraining(DDCONFIG, embed_dim=4)
    reference = AutoencoderKLTraining(DDCONFIG, embed_dim=4)
    reference.load_state_dict(ours.state_dict())
    optimizer = ours.configure_optimizers()
    plain = torch.optim.Adam(reference.parameters(), lr=ours.learning_rate, betas=(0.5, 0.9))
    x = torch.rand(2, 16, 16, 3) * 2 - 1
    loss = lambda m: m.losses(m.get_input({"image": x}), "train")[0]  # noqa: E731
    for _ in range(2):
        torch.manual_seed(1)
        one_step(ours, optimizer, loss)
        torch.manual_seed(1)
        one_step(reference, plain, loss)
    for (k, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k
    assert type(AutoencoderKLTraining(DDCONFIG, 4, optimizer="adamw8bit").configure_optimizers()) \
        is bitsandbytes.optim.AdamW8bit


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="model.params.optimizer='sgd': expected one of adamw, adamw_fused, adamw8bit"):
        check_optimizer("sgd")
    with pytest.raises(ValueError, match="optimizer='adam'"):
        dreambooth(optimizer="adam")


@pytest.fixture
def no_bitsandbytes(monkeypatch):
    """As if bitsandbytes were not installed."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else find_spec(name, *a))


def test_adamw8bit_without_bitsandbytes_is_one_line_before_any_work(no_bitsandbytes, tmp_path, capsys):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    with pytest.raises(ValueError, match="adamw8bit needs bitsandbytes"):
        build_optimizer(groups, 1e-3, name="adamw8bit")
    argv = ["-t", "--base", str(DREAMBOOTH_TINY), "--actual_resume", str(base_checkpoint(tmp_path / "base.ckpt")),
            "--data_root", str(make_images(tmp_path / "instance", 1)), "-l", str(tmp_path / "logs"),
            "model.params.optimizer=adamw8bit"]
    assert main.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.params.optimizer=adamw8bit needs bitsandbytes" in err[0], err
    assert not (tmp_path / "logs").exists()  # refused before the log dir (and any training)


def test_adamw_fused_is_the_same_adamw_in_one_kernel():
    model, twin = dreambooth(optimizer="adamw_fused"), dreambooth()
    model.learning_rate = twin.learning_rate = 1e-3
    fused, plain = model.configure_optimizers(), twin.configure_optimizers()
    assert type(fused) is torch.optim.AdamW and all(g["fused"] for g in fused.param_groups)
    assert not any(g["fused"] for g in plain.param_groups)
    assert [g["name"] for g in fused.param_groups] == [g["name"] for g in plain.param_groups]
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    one_step(model, fused, dreambooth_loss)  # the same weights, so the same gradients on both sides
    one_step(twin, plain, dreambooth_loss)
    ours, theirs = model.state_dict(), twin.state_dict()
    moved = [k for k in ours if not torch.equal(ours[k], start[k])]
    assert any(k.startswith("cond_stage_model.") for k in moved) and any(k.startswith("model.") for k in moved)
    for k in moved:  # the same update (lr-sized steps) up to float rounding
        assert torch.allclose(ours[k] - start[k], theirs[k] - start[k], rtol=1e-4, atol=1e-8), k
    with pytest.raises(ValueError, match="adamw_fused needs every trained parameter.*meta"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))]}], 1e-3, name="adamw_fused")
