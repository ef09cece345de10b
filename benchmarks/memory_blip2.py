"""Peak memory of full-size BLIP-2 OPT-2.7b captioning and training, ours against transformers.

Both sides are built from one config (``blip2.config.blip2_opt``: EVA ViT-g, 39 blocks 1408 wide; the
BERT-base Q-Former with 32 queries; OPT-2.7b; ``image_size`` 224, or 364 for the COCO fine-tuned
model, whose ViT position table is 364 px), with random weights, in one run. Ours is our ``Blip2OPT``
(captioning) or our ``Blip2OPTFinetune`` built from ``configs/blip2/*.yaml`` running its own
``training_step`` and ``configure_optimizers``; the reference is transformers'
``Blip2ForConditionalGeneration`` of the same config.

Rows:

* ``caption/<px>/<dtype>``: beam search (5 beams) over a batch of 16 images from bos alone, the ViT,
  projection and OPT in ``fp16`` or ``bf16``, the Q-Former and queries in fp32 (both sides' layout).
  Stopping is data-dependent, so both decode a fixed 30 new tokens (``min_new_tokens =
  max_new_tokens = 30``, eos "\\n"). Under FakeTensorMode a tensor has no values, so the few
  scalars the decoding loops read (``bool(...)``, ``int(...)``: stop tests, the final length) are
  replayed from a real run of a narrow twin (the same config at width 16, same depths, batch, beams
  and length), recorded per side; with the length forced they do not depend on the weights, and
  the replay checks that the full-size run reads exactly the recorded sequence.
* ``<mode>/<precision>/<ckpt>/<optimizer>[/b<batch>]``: one training step. ``stage2``
  (``configs/blip2/pretrain_stage2.yaml``: ViT and OPT frozen, Q-Former, queries, ``ln_vision`` and
  projection trained; 224 px, batch 64) or ``finetune`` (``configs/blip2/finetune_caption_coco.yaml``:
  the ViT trained too, OPT frozen; 364 px, batch 16, prompt "a photo of"); ``16-mixed`` /
  ``bf16-mixed`` / ``fp32``, the frozen parts stored in the autocast dtype (``frozen_dtype``),
  trained ones in fp32; gradient checkpointing of the ViT and OPT blocks (ours:
  ``gradient_checkpointing``; transformers: ``gradient_checkpointing_enable`` on its vision and
  language models, non-reentrant as ours); ``adamw`` or bitsandbytes' ``adamw8bit``. ``b<N>``: N
  images instead of the config's batch. Captions: 32 tokens each (``max_txt_len``), the same ids on
  both sides, the loss over the caption tokens (prompt masked). transformers' checkpointing acts in
  train mode only, so its frozen parts run in train mode with the text model's dropout at 0 (ours
  keeps frozen parts in eval mode: no dropout either way).

Measured by simulation (``benchmarks/memory.py``: FakeTensorMode + MemTracker, nothing allocated);
with ``--device cuda`` also by ``torch.cuda.max_memory_allocated``.

    python -m benchmarks.memory_blip2                  # the default 6 rows (~8 min on 2 CPU cores)
    python -m benchmarks.memory_blip2 --rows all --out memory_blip2.md
    python -m benchmarks.memory_blip2 --rows finetune/bf16-mixed/ckpt/adamw8bit --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import itertools
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from unittest import mock

import torch
from omegaconf import OmegaConf
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import memory
from benchmarks.common import machine_line, markdown_table
from benchmarks.memory_sd import breakdown, cast_, frozen_dtype, gib
from blip2.config import IMAGE_TOKEN_ID, blip2_opt
from core.cli import run_cli
from core.config import DTYPES
from core.optim import optimizer_class

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"stage2": ROOT / "configs" / "blip2" / "pretrain_stage2.yaml",
           "finetune": ROOT / "configs" / "blip2" / "finetune_caption_coco.yaml"}
IMAGE_SIZE = {"stage2": 224, "finetune": 364}  # the configs' stage2.image_size / coco.image_size
MODES = tuple(CONFIGS)
CHECKPOINTING = ("ckpt", "nockpt")
OPTIMIZERS = ("adamw", "adamw8bit")
CAPTION_SIZES = (224, 364)
CAPTION_DTYPES = ("fp16", "bf16")
CAPTION_BATCH, BEAMS = 16, 5
NEW_TOKENS = {"full": 30, "tiny": 3}
NEWLINE, PAD = 50118, 1  # OPT's "\n" (BLIP-2's caption end) and pad
CAPTION = "a large red circle next to a small blue square on a green background " * 4  # > 32 tokens
DEFAULT_ROWS = ("caption/224/fp16", "caption/364/bf16", "stage2/bf16-mixed/nockpt/adamw",
                "finetune/bf16-mixed/nockpt/adamw", "finetune/bf16-mixed/ckpt/adamw8bit",
                "finetune/16-mixed/ckpt/adamw")
QUICK_ROWS = ("caption/224/fp16", "finetune/bf16-mixed/ckpt/adamw8bit")
# the tiny size (tests): BLIP-2's structure at a few kilobytes
TINY = dict(vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               image_size=28, patch_size=7),
            qformer_config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            text_config=dict(model_type="opt", vocab_size=50304, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                             num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128),
            num_query_tokens=4, image_token_index=IMAGE_TOKEN_ID)
TINY_BATCH = 2


# ---- rows ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Row:
    """A captioning row (``mode == "caption"``: ``image_size``, ``dtype``) or a training row."""

    mode: str
    precision: str = "fp32"  # training: the Lightning precision
    checkpointing: bool = False
    optimizer: str = "adamw"
    batch: int | None = None  # training: None = the config's
    image_size: int = 224  # captioning
    dtype: str = "fp16"  # captioning: the model's dtype

    @classmethod
    def parse(cls, name: str) -> "Row":
        parts = name.split("/")
        if parts[0] == "caption":
            if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) not in CAPTION_SIZES \
                    or parts[2] not in CAPTION_DTYPES:
                raise ValueError(f"--rows {name!r}: expected caption/<px>/<dtype> with px in "
                                 f"{'|'.join(map(str, CAPTION_SIZES))}, dtype in {'|'.join(CAPTION_DTYPES)}")
            return cls("caption", image_size=int(parts[1]), dtype=parts[2])
        choices = (MODES, tuple(memory.PRECISIONS), CHECKPOINTING, OPTIMIZERS)
        batch = parts[4] if len(parts) == 5 else "b1"
        if len(parts) not in (4, 5) or any(p not in c for p, c in zip(parts, choices)) \
                or not (batch.startswith("b") and batch[1:].isdigit() and int(batch[1:]) > 0):
            raise ValueError(f"--rows {name!r}: expected caption/<px>/<dtype> or mode/precision/ckpt/optimizer[/b<N>] "
                             f"with mode in {'|'.join(MODES)}, precision in {'|'.join(memory.PRECISIONS)}, "
                             f"{'|'.join(CHECKPOINTING)}, optimizer in {'|'.join(OPTIMIZERS)}, N > 0")
        return cls(parts[0], parts[1], parts[2] == "ckpt", parts[3], int(parts[4][1:]) if len(parts) == 5 else None)

    @property
    def name(self) -> str:
        if self.mode == "caption":
            return f"caption/{self.image_size}/{self.dtype}"
        name = "/".join((self.mode, self.precision, "ckpt" if self.checkpointing else "nockpt", self.optimizer))
        return name if self.batch is None else f"{name}/b{self.batch}"

    @property
    def inference(self) -> bool:
        return self.mode == "caption"

    @property
    def step_precision(self) -> str:
        """The autocast of the measured call: captioning runs the half-precision model as it is."""
        return "fp32" if self.inference else self.precision


def all_rows() -> list[str]:
    captions = [f"caption/{s}/{d}" for s, d in itertools.product(CAPTION_SIZES, CAPTION_DTYPES)]
    return captions + ["/".join(r) for r in itertools.product(MODES, memory.PRECISIONS, CHECKPOINTING, OPTIMIZERS)]


def model_config(size: str, row: Row) -> dict[str, Any]:
    """The ``Blip2Config`` dict of both sides: BLIP-2 OPT-2.7b at the row's image size (or the tiny one)."""
    image_size = row.image_size if row.inference else IMAGE_SIZE[row.mode]
    if size == "tiny":
        return blip2_config_dict(TINY)
    return blip2_opt("2.7b", image_size=image_size)


def blip2_config_dict(config: dict[str, Any]) -> dict[str, Any]:
    from blip2.config import normalize_config

    return normalize_config(copy.deepcopy(config))


def batch_size(size: str, row: Row) -> int:
    if row.inference:
        return CAPTION_BATCH if size == "full" else TINY_BATCH
    if row.batch is not None:
        return row.batch
    return OmegaConf.load(CONFIGS[row.mode]).data.params.batch_size if size == "full" else TINY_BATCH


def pixels(size: str, row: Row, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    s = model_config(size, row)["vision_config"]["image_size"]
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size(size, row), 3, s, s, generator=gen).to(dtype)


@contextlib.contextmanager
def in_place_casts() -> Iterator[None]:
    """``Module.to`` / ``float()`` / ``half()`` cast each parameter's ``.data`` and each buffer in place.
    Under FakeTensorMode ``Module._apply`` would swap the tensors, which fails; the dtypes and devices
    that result are the same."""
    def _apply(self: nn.Module, fn: Callable, recurse: bool = True) -> nn.Module:
        if recurse:
            for child in self.children():
                child._apply(fn)
        for param in self._parameters.values():
            if param is not None:
                param.data = fn(param.data)
        for key, buf in self._buffers.items():
            if buf is not None:
                self._buffers[key] = fn(buf)
        return self

    with mock.patch.object(nn.Module, "_apply", _apply):
        yield


# ---- replaying the scalars the decoding loops read ----------------------------------------------
class Scalars(TorchDispatchMode):
    """Record (``values=None``) or replay the results of ``aten._local_scalar_dense`` (``item()``,
    ``bool()``, ``int()`` of a tensor); every other op runs as usual. Values are keyed by the line of
    the model's code that reads them (the first frame outside torch) and replayed in order per line:
    some library code reads a value on real tensors only (transformers skips an all-ones mask test
    on fake ones), so one global sequence would not line up."""

    def __init__(self, values: dict[str, list[Any]] | None = None):
        super().__init__()
        self.replaying = values is not None
        self.values: dict[str, list[Any]] = {k: list(v) for k, v in (values or {}).items()}
        self.read: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func is not torch.ops.aten._local_scalar_dense.default:
            return func(*args, **(kwargs or {}))
        site = caller()
        if not self.replaying:
            self.values.setdefault(site, []).append(func(*args, **(kwargs or {})))
            return self.values[site][-1]
        done = self.read.get(site, 0)
        if done >= len(self.values.get(site, ())):
            raise RuntimeError(f"the full-size decoding reads a scalar at {site} that its twin read "
                               f"{len(self.values.get(site, ()))} times")
        self.read[site] = done + 1
        return self.values[site][done]

    def check_done(self) -> None:
        """Every line read its values as often as in the twin (a line the twin reads on real tensors only
        may be skipped)."""
        short = {k: (self.read[k], len(v)) for k, v in self.values.items() if k in self.read and self.read[k] != len(v)}
        if short:
            raise RuntimeError(f"the full-size decoding read fewer scalars than its twin at {short}")


def caller() -> str:
    """``file:line`` of the innermost frame outside torch (and this file)."""
    frame = sys._getframe(2)
    while frame is not None and ("/torch/" in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"


def narrow(config: dict[str, Any], width: int = 16) -> dict[str, Any]:
    """The same config at width ``width`` (2 heads, FFN 2x width): the twin whose decoding is recorded."""
    out = copy.deepcopy(config)
    for section in ("vision_config", "qformer_config", "text_config"):
        out[section].update(hidden_size=width, num_attention_heads=2)
    out["vision_config"]["intermediate_size"] = out["qformer_config"]["intermediate_size"] = 2 * width
    out["text_config"].update(ffn_dim=2 * width, word_embed_proj_dim=width)
    out["qformer_config"]["encoder_hidden_size"] = width
    return out


def generation_options(size: str) -> dict[str, Any]:
    n = NEW_TOKENS[size]
    return dict(num_beams=BEAMS, max_new_tokens=n, min_new_tokens=n, eos_token_id=NEWLINE)


def recorded_caption(size: str, row: Row, side: str) -> dict[str, list[Any]]:
    """The scalars one side's captioning call reads, from a real run of the narrow twin."""
    return _recorded(size, row.image_size, row.dtype, side)


@functools.lru_cache(maxsize=None)
def _recorded(size: str, image_size: int, dtype: str, side: str) -> dict[str, list[Any]]:
    row = Row("caption", image_size=image_size, dtype=dtype)
    twin = narrow(model_config(size, row))
    with unset_fake_temporarily(), torch.device("cpu"):
        torch.manual_seed(0)
        network = CAPTIONERS[side](twin, DTYPES[dtype])
        x = pixels(size, row, DTYPES[dtype])
        recorder = Scalars()
        with recorder:
            out = run_caption(side, network, x, size)
    if out.shape[1] != NEW_TOKENS[size]:
        raise RuntimeError(f"{side}'s twin decoded {out.shape[1]} new tokens, expected {NEW_TOKENS[size]}")
    return recorder.values


# ---- captioning -----------------------------------------------------------------------------------
def our_captioner(config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    from blip2 import Blip2OPT

    with in_place_casts():
        model = Blip2OPT.from_config(config, dtype=dtype, device=torch.get_default_device())
    return model.requires_grad_(False)


def reference_captioner(config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """transformers' model in the layout ``from_pretrained(dtype=...)`` gives: its ``_keep_in_fp32_modules``
    (queries and Q-Former) in fp32, the rest in ``dtype``."""
    model = reference_model(config).eval()
    for part in (model.vision_model, model.language_projection, model.language_model):
        cast_(part.requires_grad_(False), dtype)
    return model.requires_grad_(False)


def simulating() -> bool:
    """Inside FakeTensorMode (a new tensor is fake)?"""
    return isinstance(torch.empty(()), FakeTensor)


def reference_init() -> contextlib.AbstractContextManager:
    """transformers' weight init, except in a simulation (its truncated normal loops on the values
    drawn; fake tensors have none, and their values do not matter)."""
    from transformers.initialization import no_init_weights

    return no_init_weights() if simulating() else contextlib.nullcontext()


def reference_model(config: dict[str, Any]) -> nn.Module:
    """transformers' ``Blip2ForConditionalGeneration`` of ``config``, its output head tied to the token
    embedding (as its weight init would tie it)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    with reference_init():
        model = Blip2ForConditionalGeneration(Blip2Config(**config))
    model.tie_weights()
    head, embed = model.language_model.lm_head.weight, model.language_model.get_input_embeddings().weight
    if head is not embed:
        raise RuntimeError("transformers' OPT head is not tied to its embedding")
    return model


CAPTIONERS: dict[str, Callable[[dict[str, Any], torch.dtype], nn.Module]] = {
    "ours": our_captioner, "transformers": reference_captioner}


def run_caption(side: str, network: nn.Module, x: torch.Tensor, size: str) -> torch.Tensor:
    """The new tokens [B, L] of one side's beam-search captioning."""
    with torch.no_grad():
        if side == "ours":
            return network.generate_ids(x, **generation_options(size))
        out = network.generate(pixel_values=x, pad_token_id=PAD, **generation_options(size))
        return out[:, network.config.num_query_tokens + 1:]  # after the <image> ids and bos


def caption_job(size: str, row: Row, side: str) -> memory.Job:
    dtype = DTYPES[row.dtype]
    network = CAPTIONERS[side](model_config(size, row), dtype)
    x = pixels(size, row, dtype)
    if not simulating():  # real tensors: nothing to replay
        return memory.Job(modules=[network], forward=lambda: run_caption(side, network, x, size), inputs=[x])
    scalars = recorded_caption(size, row, side)  # now, before the tracker's module hooks are installed

    def forward() -> torch.Tensor:
        replay = Scalars(scalars)
        with replay:
            out = run_caption(side, network, x, size)
        replay.check_done()
        return out

    return memory.Job(modules=[network], forward=forward, inputs=[x])


# ---- training -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def tokenizer_folder() -> str:
    """A small OPT-style byte-level BPE (the toy world's; any tokenizer: only the 32-token length counts)."""
    from toy.captioner import train_tokenizer

    folder = tempfile.mkdtemp(prefix="memory_blip2_tokenizer_")
    train_tokenizer(folder, num=200)
    return folder


def system_config(size: str, row: Row) -> dict[str, Any]:
    """The config's ``model`` block, set as the row says, with random weights instead of ``pretrained``."""
    cfg = OmegaConf.load(CONFIGS[row.mode])
    params = cfg.model.params
    params.pretrained = None
    params.config = model_config(size, row)
    params.tokenizer = tokenizer_folder()
    params.gradient_checkpointing = row.checkpointing
    params.optimizer = row.optimizer
    params.frozen_dtype = frozen_dtype(row)
    params.learning_rate = cfg.model.base_learning_rate
    params.scheduler_config.params.max_epochs = cfg.lightning.trainer.max_epochs  # no Trainer here
    return OmegaConf.to_container(cfg.model, resolve=True)


def captions(size: str, row: Row) -> list[str]:
    return [CAPTION] * batch_size(size, row)


@dataclasses.dataclass
class Trainer:
    """One side's training job and its network (the test copies weights between the networks)."""

    job: memory.Job
    network: nn.Module


def our_training(size: str, row: Row) -> Trainer:
    from blip2.models.finetune import Blip2OPTFinetune

    cfg = system_config(size, row)
    with in_place_casts():
        system = Blip2OPTFinetune(**cfg["params"])
    system.train()
    x = pixels(size, row)
    batch = {"image": x, "text_input": captions(size, row)}
    job = memory.Job(modules=[system], forward=lambda: system.training_step(batch, 0),
                     make_optimizer=system.configure_optimizers, inputs=[x])
    return Trainer(job, system.model)


def reference_tokens(size: str, row: Row, num_queries: int) -> dict[str, torch.Tensor]:
    """The text of ours (``caption_tokens``: the same ids, mask and labels) behind ``num_queries``
    ``<image>`` ids, the labels -100 there: transformers' input layout."""
    from transformers import AutoTokenizer

    from blip2.losses.caption_lm import IGNORE_INDEX, caption_tokens, prompt_length, with_prompt

    params = OmegaConf.load(CONFIGS[row.mode]).model.params
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(), local_files_only=True)
    tokens = caption_tokens(tokenizer, with_prompt(params.prompt, captions(size, row)),
                            prompt_length(tokenizer, params.prompt), params.max_txt_len)
    batch = tokens.input_ids.shape[0]
    image = torch.full((batch, num_queries), IMAGE_TOKEN_ID)
    return {"input_ids": torch.cat([image, tokens.input_ids], 1),
            "attention_mask": torch.cat([torch.ones_like(image), tokens.attention_mask], 1),
            "labels": torch.cat([torch.full_like(image, IGNORE_INDEX), tokens.labels], 1)}


def reference_training(size: str, row: Row) -> Trainer:
    """transformers' model trained as ours: the same parts frozen (ViT embeddings and blocks unless
    ``finetune``, OPT always) and stored in the autocast dtype, the rest fp32; its own loss."""
    params = OmegaConf.load(CONFIGS[row.mode]).model.params
    config = copy.deepcopy(model_config(size, row))
    config["text_config"]["dropout"] = 0.0  # ours keeps the frozen OPT in eval mode
    model = reference_model(config)
    weight_dtype = memory.PRECISIONS[row.precision] or torch.float32
    frozen = [model.language_model] + ([model.vision_model.embeddings, model.vision_model.encoder]
                                        if params.freeze_vit else [])
    model.train()
    for part in frozen:
        cast_(part.requires_grad_(False), weight_dtype)
        part.train(row.checkpointing)  # its checkpointing acts in train mode only
    if row.checkpointing:
        for part in (model.vision_model, model.language_model):
            part.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    x = pixels(size, row)
    text = reference_tokens(size, row, config["num_query_tokens"])

    def make_optimizer() -> torch.optim.Optimizer:
        trained = [p for p in model.parameters() if p.requires_grad]
        return optimizer_class(row.optimizer)(trained, lr=OmegaConf.load(CONFIGS[row.mode]).model.base_learning_rate,
                                              betas=(0.9, params.beta2), weight_decay=params.weight_decay)

    job = memory.Job(modules=[model], forward=lambda: model(pixel_values=x, **text).loss,
                     make_optimizer=make_optimizer, inputs=[x, *text.values()])
    return Trainer(job, model)


TRAINERS: dict[str, Callable[[str, Row], Trainer]] = {"ours": our_training, "transformers": reference_training}


def job(size: str, row: Row, side: str) -> memory.Job:
    return caption_job(size, row, side) if row.inference else TRAINERS[side](size, row).job


# ---- measuring and reporting --------------------------------------------------------------------
SIDES = ("ours", "transformers")


def measure_row(size: str, row: Row, device: torch.device) -> dict[str, Any]:
    result: dict[str, Any] = {"row": row.name, "batch": batch_size(size, row)}
    for side in SIDES:
        start = time.perf_counter()
        peak = memory.simulate(lambda: job(size, row, side), row.step_precision)
        result[side] = {"peak": peak.total, "parts": peak.parts, "seconds": time.perf_counter() - start}
        if device.type == "cuda":
            real = memory.measure_cuda(lambda: job(size, row, side), row.step_precision, device)
            result[side]["cuda_peak"], result[side]["cuda_parts"] = real.total, real.parts
    result["ratio"] = result["ours"]["peak"] / result["transformers"]["peak"]
    if device.type == "cuda":
        result["cuda_ratio"] = result["ours"]["cuda_peak"] / result["transformers"]["cuda_peak"]
    return result


def table(results: list[dict[str, Any]], cuda: bool) -> str:
    header = ["row", "batch", "ours GiB", "transformers GiB", "ours / transformers",
              "ours at peak: params / grads / optimizer / activations / temp"]
    header += ["CUDA ours GiB", "CUDA transformers GiB", "CUDA ours / transformers"] if cuda else []
    rows = []
    for r in results:
        cells = [r["row"], str(r["batch"]), gib(r["ours"]["peak"]), gib(r["transformers"]["peak"]),
                 f"{r['ratio']:.2f}", breakdown(r["ours"]["parts"])]
        if cuda:
            cells += [gib(r["ours"]["cuda_peak"]), gib(r["transformers"]["cuda_peak"]), f"{r['cuda_ratio']:.2f}"]
        rows.append(cells)
    return markdown_table(header, rows)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    return memory.table_parser(
        __doc__.split("\n\n")[0], quick_rows=QUICK_ROWS,
        rows_help="rows caption/<px>/<dtype> or stage2|finetune/precision/ckpt|nockpt/optimizer[/b<N>], "
                  f"or 'all' ({len(all_rows())} rows); default: {', '.join(DEFAULT_ROWS)}",
        tiny_help="a tiny BLIP-2 of the same structure: seconds, for tests").parse_args(argv)


def selected_rows(args: argparse.Namespace) -> list[Row]:
    return [Row.parse(n) for n in memory.row_names(args, QUICK_ROWS, DEFAULT_ROWS, all_rows)]


def run(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    rows, device, size = selected_rows(args), torch.device(args.device), "tiny" if args.tiny else "full"
    memory.check_device(device)
    warnings.filterwarnings("ignore", message=".*self.trainer.*")  # Lightning's log without a Trainer
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    what = "BLIP-2 OPT-2.7b" if size == "full" else "tiny BLIP-2"
    print(f"# {what}: captioning (beam {BEAMS}, {NEW_TOKENS[size]} new tokens) and training steps; "
          f"{machine_line(device)}", flush=True)
    start = time.perf_counter()
    memory.report_rows(rows, lambda row: measure_row(size, row, device), "transformers",
                       lambda results: table(results, device.type == "cuda"), args.out)
    print(f"# {len(rows)} rows in {time.perf_counter() - start:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("benchmarks.memory_blip2", run, argv)


if __name__ == "__main__":
    sys.exit(main())
