"""Peak memory of one training step (forward, backward, optimizer step) or one inference call, for any
model: simulated on any machine, measured on a CUDA device.

A measurement runs a ``Job``: the modules it holds, a ``forward`` giving the loss (training) or the
output (inference), and the optimizer it trains with. Steps:

1. ``build()`` makes the job: inside ``FakeTensorMode`` for a simulation (every tensor is a shape,
   dtype and device without storage, so a full-size model "runs" in a few GB of host memory), on the
   device for a CUDA measurement.
2. The optimizer is built (outside fake mode: bitsandbytes computes its quantisation maps from data)
   and primed with one step on zero gradients, so its state exists as in every step but the first;
   the gradients are then freed (``zero_grad(set_to_none=True)``, Lightning's and torch's default).
3. The step: ``forward`` under autocast (``16-mixed``: fp32 weights, fp16 autocast; ``bf16-mixed``;
   ``fp32``: none), ``backward``, ``optimizer.step``, ``zero_grad``. Inference: ``forward`` under
   ``no_grad`` (and autocast).
4. The peak: simulated, ``torch.distributed._tools.mem_tracker.MemTracker``'s peak snapshot (every
   tensor storage alive at the worst moment, by kind: parameters, buffers, gradients, optimizer state,
   activations, backward temporaries, inputs); on CUDA also ``torch.cuda.max_memory_allocated``.

A simulation imitates a CUDA run where the host's defaults differ (``Sim``): AdamW's multi-tensor
(``foreach``) step, CUDA's default on GPUs (it allocates temporaries as large as the parameters), and
CUDA autocast's float32 list (layer_norm, group_norm, softmax, ... run in float32 on CUDA; CPU autocast
leaves them in 16 bit). The tracker's module hooks keep no gradient alive (torch's keep a module's first
input gradients until its last one arrives). Not simulated: the caching allocator's block rounding and
fragmentation (what ``max_memory_reserved`` adds), cuDNN / cuBLAS workspaces, and the GradScaler's few
scalars (``16-mixed`` here scales nothing: its unscale is in place and changes no peak).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import warnings
from typing import Any, Callable, Iterator, Sequence
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.autograd.graph import _get_grad_fn_or_grad_acc
from torch.distributed._tools import mod_tracker
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils.hooks import RemovableHandle

PRECISIONS = {"fp32": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
# MemTracker's kinds -> the names reported here
KINDS = {_MemRefType.PARAM: "params", _MemRefType.BUFFER: "buffers", _MemRefType.GRAD: "grads",
         _MemRefType.OPT: "optimizer", _MemRefType.ACT: "activations", _MemRefType.TEMP: "temp",
         _MemRefType.OTH: "inputs"}
# CUDA autocast runs these in float32 (torch.amp docs, "CUDA Ops that can autocast to float32");
# CPU autocast keeps them in the lower precision. Only those that sd-v1 and BLIP-2 call are listed.
# (torch.nn.functional names; the attention of both sides is scaled_dot_product_attention, which
# autocasts to 16 bit on both devices)
CUDA_FP32_FUNCTIONS = ("layer_norm", "group_norm", "softmax", "log_softmax", "mse_loss", "cross_entropy")


@dataclasses.dataclass
class Job:
    """One measured call. ``modules``: every module it holds (tracked with their parameters and
    buffers); ``forward()``: the loss of a training step, or the output of an inference call;
    ``make_optimizer()``: the optimizer over the trainable parameters (None: inference);
    ``inputs``: the tensors it reads (counted as inputs)."""

    modules: Sequence[nn.Module]
    forward: Callable[[], Any]
    make_optimizer: Callable[[], torch.optim.Optimizer] | None = None
    inputs: Sequence[torch.Tensor] = ()


@dataclasses.dataclass
class Peak:
    """The peak bytes of one job (``total``) and what was alive then (``parts``, by kind; on CUDA
    the held tensors counted directly and the rest as ``step``). ``method``: how it was taken."""

    total: int
    parts: dict[str, int]
    method: str

    def gib(self, part: str | None = None) -> float:
        return (self.total if part is None else self.parts.get(part, 0)) / 2**30


@dataclasses.dataclass(frozen=True)
class Sim:
    """How a simulation imitates the GPU it stands for (both on by default: a CUDA device)."""

    foreach: bool = True  # torch optimizers take the multi-tensor step, as on CUDA
    cuda_autocast: bool = True  # CUDA autocast's float32 list


_TORCH_MULTI_GRAD_HOOK = mod_tracker.register_multi_grad_hook


def _multi_grad_hook_holding_nothing(tensors: Sequence[torch.Tensor], fn: Callable[..., None], *,
                                     mode: str = "all") -> RemovableHandle:
    """``torch.autograd.graph.register_multi_grad_hook`` for MemTracker's module tracker, without its
    cost: in ``"all"`` mode torch's version keeps each gradient it has seen until the last one of
    ``tensors`` arrives, to pass them all to ``fn``. The tracker registers one on every module's tensor
    inputs (to know when the module's backward ends), so a module given a tensor whose gradient is
    complete only at the end of the backward (the text context of a cross-attention, the timestep
    embedding of a ResBlock: they feed every block) kept its other input's gradient alive that long,
    bytes that a run without the tracker frees at once. This one counts the gradients as torch's does
    and calls ``fn`` with ``None`` for each (the tracker's ``fn`` does not read them)."""
    if mode != "all":
        return _TORCH_MULTI_GRAD_HOOK(tensors, fn, mode=mode)
    grad_fns, n = [_get_grad_fn_or_grad_acc(t) for t in tensors], len(tensors)  # not the tensors: they would live on
    counts: dict[int, list[int]] = {}  # backward call -> [gradients seen, gradients expected]

    def hook(grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task not in counts:  # as torch: the tensors this backward reaches, known at its first call
            counts[task] = [0, sum(map(torch._C._will_engine_execute_node, grad_fns))]
        counts[task][0] += 1
        if counts[task][0] == counts[task][1]:
            del counts[task]
            fn([None] * n)

    return torch.autograd.graph._MultiHandle(tuple(t.register_hook(hook) for t in tensors))


class _Tracker(MemTracker):
    """MemTracker with three changes. Gradient hooks only on parameters that require gradients (its
    own registration fails on a frozen parameter); only the global peak is updated per operation
    (its per-module peaks cost a pass over every module at every operation: minutes at full size);
    and its module tracker holds no gradients (``_multi_grad_hook_holding_nothing``)."""

    def __enter__(self) -> "_Tracker":
        self._hook_patch = mock.patch.object(mod_tracker, "register_multi_grad_hook", _multi_grad_hook_holding_nothing)
        self._hook_patch.start()
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        super().__exit__(*args)
        self._hook_patch.stop()

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
        held = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for param in module.parameters():
                if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(self._grad_hook),
                        param.register_post_accumulate_grad_hook(lambda p: self._grad_hook(p.grad)))
        return held

    def _grad_hook(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _update_peak_stats(self, peak_state: Any) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot["Total"]:
                self._peak_mem[device] = snapshot["Total"]
                self._peak_mem_snap[device] = dict(snapshot)


@contextlib.contextmanager
def _cuda_autocast_policy() -> Iterator[None]:
    """While CPU autocast is on, ``CUDA_FP32_FUNCTIONS`` run on float32 inputs, as under CUDA autocast.
    The functions are replaced in ``torch.nn.functional`` for the block (a torch-function mode would
    not reach the recomputation of checkpointed blocks in the backward pass)."""
    originals = {name: getattr(F, name) for name in CUDA_FP32_FUNCTIONS}

    def in_fp32(func: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_autocast_enabled("cpu"):
                return func(*args, **kwargs)
            up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a  # noqa: E731
            with torch.autocast("cpu", enabled=False):
                return func(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
        return run

    try:
        for name, func in originals.items():
            setattr(F, name, in_fp32(func))
        yield
    finally:
        for name, func in originals.items():
            setattr(F, name, func)


class _Root(nn.Module):
    """One root over the job's modules: MemTracker refuses a root module called twice in a step
    (DreamBooth runs its VAE once per half of the batch), not a submodule."""

    def __init__(self, job: Job):
        super().__init__()
        self.held = nn.ModuleList(job.modules)
        self.job = job

    def forward(self) -> Any:
        return self.job.forward()


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def trainable(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        seen.update((id(p), p) for p in module.parameters() if p.requires_grad)
    return list(seen.values())


def prepare_optimizer(job: Job, foreach: bool) -> torch.optim.Optimizer | None:
    """Build the job's optimizer outside fake mode and prime it with one step on zero gradients."""
    if job.make_optimizer is None:
        return None
    with unset_fake_temporarily():
        optimizer = job.make_optimizer()
    if foreach and isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)):
        for group in optimizer.param_groups:
            group["foreach"] = True if group.get("foreach") is None else group["foreach"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def run_step(job: Job, optimizer: torch.optim.Optimizer | None, precision: str, device_type: str) -> None:
    """Step 3 of the module docstring, on an already built and primed job."""
    if optimizer is None:
        with torch.no_grad(), autocast(precision, device_type):
            _Root(job)()
        return
    with autocast(precision, device_type):
        loss = _Root(job)()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _tracked(build: Callable[[], Job], precision: str, fake: bool, sim: Sim) -> Peak:
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    policy = _cuda_autocast_policy() if sim.cuda_autocast else contextlib.nullcontext()
    with mode, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Module is None.*")  # ModTracker, for a freed module
        job = build()
        optimizer = prepare_optimizer(job, sim.foreach)
        tracker = _Tracker()
        tracker.track_external(*job.modules, *job.inputs, *([optimizer] if optimizer else []))
        with tracker, policy:
            run_step(job, optimizer, precision, "cpu")
        snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()), {"Total": 0})
    parts = {KINDS[k]: v for k, v in snapshot.items() if k in KINDS}
    how = "simulated: FakeTensorMode + MemTracker" if fake else "MemTracker on real CPU tensors"
    return Peak(total=snapshot["Total"], parts=parts, method=how)


def simulate(build: Callable[[], Job], precision: str = "fp32", sim: Sim = Sim()) -> Peak:
    """The peak of ``build()``'s step, executed under FakeTensorMode (nothing is allocated)."""
    return _tracked(build, precision, fake=True, sim=sim)


def track_real(build: Callable[[], Job], precision: str = "fp32", sim: Sim = Sim()) -> Peak:
    """The same accounting on real CPU tensors (what the simulation must reproduce)."""
    return _tracked(build, precision, fake=False, sim=sim)


def tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def measure_cuda(build: Callable[[], Job], precision: str, device: torch.device) -> Peak:
    """``torch.cuda.max_memory_allocated`` over the step, above what was allocated before ``build``
    (so earlier jobs do not count); parts: the held parameters, buffers and optimizer state counted
    directly, ``step`` the rest of the peak (gradients, activations, temporaries)."""
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    with torch.device(device):
        job = build()
        optimizer = prepare_optimizer(job, foreach=False)  # torch's own CUDA defaults
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_step(job, optimizer, precision, "cuda")
    torch.cuda.synchronize(device)
    total = torch.cuda.max_memory_allocated(device) - before
    modules = nn.ModuleList(job.modules)
    parts = {"params": tensor_bytes(modules.parameters()), "buffers": tensor_bytes(modules.buffers()),
             "optimizer": tensor_bytes(optimizer_tensors(optimizer)) if optimizer else 0}
    parts["step"] = total - sum(parts.values())
    del job, optimizer, modules
    return Peak(total=total, parts=parts, method="torch.cuda.max_memory_allocated")


# ---- the command line and report of the memory tables (memory_sd, memory_blip2) ---------------------
def table_parser(description: str, rows_help: str, quick_rows: Sequence[str], tiny_help: str):
    """--rows / --quick / --tiny / --device / --out, as every memory table takes them."""
    from core.cli import ArgumentParser

    p = ArgumentParser(description=description)
    p.add_argument("--rows", nargs="+", default=None, help=rows_help)
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(quick_rows)}")
    p.add_argument("--tiny", action="store_true", help=tiny_help)
    p.add_argument("--device", default="cpu", help="cuda: also measure with torch.cuda.max_memory_allocated")
    p.add_argument("--out", default=None, help="also write the results: .json, else markdown")
    return p


def row_names(args: Any, quick_rows: Sequence[str], default_rows: Sequence[str],
              every_row: Callable[[], list[str]]) -> list[str]:
    """The names --quick, --rows (``all``: ``every_row()``) or the default select."""
    names = list(quick_rows) if args.quick else args.rows or list(default_rows)
    return every_row() if names == ["all"] else names


def check_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (the simulation runs without one: leave --device out)")


def report_rows(rows: Sequence[Any], measure: Callable[[Any], dict], reference: str,
                table: Callable[[list[dict]], str], out: str | None) -> list[dict]:
    """Measure each row (a line per row as it ends), print the table, write ``out`` (.json, else markdown)."""
    import json
    from pathlib import Path

    results = []
    for row in rows:
        results.append(r := measure(row))
        print(f"# {row.name}: ours {r['ours']['peak'] / 2**30:.2f} GiB, {reference} "
              f"{r[reference]['peak'] / 2**30:.2f} GiB, ratio {r['ratio']:.2f} ({r['ours']['seconds']:.0f} s + "
              f"{r[reference]['seconds']:.0f} s)", flush=True)
    text = table(results)
    print(text)
    if out:
        Path(out).write_text(json.dumps(results, indent=1) if Path(out).suffix == ".json" else text + "\n")
    return results
