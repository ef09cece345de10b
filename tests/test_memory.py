"""The memory benchmarks' core (benchmarks/memory.py) and the sd-v1 DreamBooth memory table
(benchmarks/memory_sd.py), on tiny models: the simulation reproduces a real run's accounting, the
accounting adds up, and the script runs end to end."""
from __future__ import annotations

import json
import math

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from benchmarks import memory, memory_sd

BLOCK = 256  # bitsandbytes' block size of the 8-bit optimizer states (absmax per block)
MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for tensors smaller than this


class Mlp(nn.Module):
    """Two pre-LN MLP blocks, optionally checkpointed."""

    def __init__(self, width: int = 64, checkpointed: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                                  nn.Linear(4 * width, width)) for _ in range(2))
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + (checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x))
        return x


def mlp_job(optimizer: str = "adamw", checkpointed: bool = False, batch: int = 64) -> memory.Job:
    torch.manual_seed(0)
    net = Mlp(checkpointed=checkpointed)
    x = torch.randn(batch, 64)
    cls = torch.optim.AdamW if optimizer == "adamw" else bnb.optim.AdamW8bit
    return memory.Job(modules=[net], forward=lambda: net(x).square().mean(),
                      make_optimizer=lambda: cls(net.parameters(), lr=1e-3), inputs=[x])


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def adamw8bit_state_bytes(module: nn.Module) -> int:
    """bitsandbytes' layout: uint8 state1 and state2 plus a float32 absmax per 256-block each for
    tensors of 4096 elements or more; float32 state1 and state2 for the smaller ones."""
    total = 0
    for p in module.parameters():
        n = p.numel()
        total += 2 * n + 2 * 4 * math.ceil(n / BLOCK) if n >= MIN_8BIT_SIZE else 2 * 4 * n
    return total


def test_simulated_dreambooth_step_equals_a_real_tracked_step():
    """Our tiny DreamBooth step (text encoder trained, bf16-mixed), executed for real on CPU tensors
    and under FakeTensorMode: the same peak and the same parts, to the byte (checkpointing: above)."""
    row = memory_sd.Row.parse("unet+te/bf16-mixed/nockpt/adamw")
    build = lambda: memory_sd.ours("tiny", row)  # noqa: E731
    simulated = memory.simulate(build, row.precision)
    real = memory.track_real(build, row.precision)
    assert simulated.total == real.total > 0
    assert simulated.parts == real.parts
    assert simulated.method.startswith("simulated") and real.method.startswith("MemTracker on real")


def test_peak_holds_params_grads_and_optimizer_state():
    """AdamW (float32): at the peak, the parameters, their gradients and two moments per parameter
    are all alive; AdamW8bit's state is bitsandbytes' 8-bit layout, measured, and about 4x smaller."""
    net_bytes = param_bytes(Mlp())
    adamw = memory.simulate(lambda: mlp_job("adamw"))
    assert adamw.parts["params"] == net_bytes
    assert adamw.parts["grads"] == net_bytes
    assert adamw.parts["optimizer"] >= 2 * net_bytes
    assert adamw.total >= adamw.parts["params"] + adamw.parts["grads"] + adamw.parts["optimizer"]
    eight = memory.simulate(lambda: mlp_job("adamw8bit"))
    assert eight.parts["params"] == net_bytes
    expected_state = adamw8bit_state_bytes(Mlp())
    assert expected_state <= eight.parts["optimizer"] < 1.1 * expected_state
    assert eight.parts["optimizer"] < adamw.parts["optimizer"] / 3
    assert eight.total < adamw.total


def test_checkpointing_and_mixed_precision_cut_activations():
    """With a large batch the activations make the peak (at the end of the forward pass): checkpointed
    blocks keep only their inputs, and bf16 autocast keeps 16-bit copies where fp32 keeps 32-bit ones."""
    plain = memory.track_real(lambda: mlp_job(batch=2048))
    ckpt = memory.track_real(lambda: mlp_job(checkpointed=True, batch=2048))
    activations = 2 * 2048 * (64 + 4 * 64 + 4 * 64 + 64) * 4  # kept for backward: LN, Linear, GELU outs, residual
    assert plain.total >= activations + plain.parts["params"] and activations > 10 * plain.parts["params"]
    assert ckpt.total < 0.75 * plain.total  # one block recomputed at a time in the backward pass
    assert memory.simulate(lambda: mlp_job(checkpointed=True, batch=2048)).total == ckpt.total
    bf16 = memory.simulate(lambda: mlp_job(batch=2048), "bf16-mixed")
    assert bf16.parts["activations"] < 0.75 * plain.parts["activations"]


def test_inference_job_has_no_gradients_or_optimizer():
    net = Mlp()
    x = torch.randn(64, 64)
    peak = memory.simulate(lambda: memory.Job(modules=[net], forward=lambda: net(x), inputs=[x]))
    assert peak.parts["params"] == param_bytes(net)
    assert peak.parts.get("grads", 0) == 0 and peak.parts.get("optimizer", 0) == 0
    assert peak.total > peak.parts["params"]


def test_memory_sd_runs_end_to_end_and_prints_ratios(tmp_path, capsys):
    out = tmp_path / "memory.json"
    assert memory_sd.main(["--tiny", "--rows", "lora4/16-mixed/nockpt/adamw8bit", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| lora4/16-mixed/nockpt/adamw8bit |" in printed and "ours / diffusers" in printed
    (result,) = json.loads(out.read_text())
    assert result["row"] == "lora4/16-mixed/nockpt/adamw8bit"
    ours, ref = result["ours"], result["diffusers"]
    assert ours["peak"] > ours["parts"]["params"] > 0 and ref["peak"] > ref["parts"]["params"] > 0
    assert result["ratio"] == pytest.approx(ours["peak"] / ref["peak"])
    assert f"{result['ratio']:.2f}" in printed


def test_memory_sd_refuses_an_unknown_row(capsys):
    assert memory_sd.main(["--tiny", "--rows", "unet/fp8/ckpt/adamw"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unet/fp8/ckpt/adamw" in err[0] and "precision in" in err[0]


class Conditioned(nn.Module):
    """Blocks that all read one context (as the UNet's cross-attentions read the text and its
    ResBlocks the timestep embedding): its gradient is complete only after every block's backward."""

    def __init__(self, width: int = 512, depth: int = 4, keyword: bool = False):
        super().__init__()
        self.context = nn.Parameter(torch.randn(1, width))
        self.blocks = nn.ModuleList(ContextBlock(width) for _ in range(depth))
        self.keyword = keyword

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = 2 * self.context  # a computed tensor, as the text encoder's output
        for block in self.blocks:
            x = block(x, context=c) if self.keyword else block(x, c)
        return x.square().mean()


class ContextBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(x) * context)


def test_module_inputs_passed_positionally_cost_nothing_extra():
    """MemTracker's module tracker waits for the gradients of all of a module's positional tensor
    inputs; torch's hook for that kept those that came first (here each block's x-gradient, until the
    context's is complete) alive, bytes no run without the tracker holds (3 x 128 KiB here: the
    positional peak was larger). The peak must not depend on how the arguments are passed."""
    def job(keyword: bool) -> memory.Job:
        torch.manual_seed(0)
        net = Conditioned(keyword=keyword)
        x = torch.randn(64, 512)  # small beside the weights: the peak is at the end of the backward
        return memory.Job(modules=[net], forward=lambda: net(x),
                          make_optimizer=lambda: torch.optim.SGD(net.parameters(), lr=0.1), inputs=[x])

    positional, keyword = memory.track_real(lambda: job(False)), memory.track_real(lambda: job(True))
    assert positional.total == keyword.total
    assert positional.parts == keyword.parts
    assert memory.simulate(lambda: job(False)).total == keyword.total
