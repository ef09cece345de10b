"""Class images for DreamBooth's prior-preservation loss (Ruiz et al. 2022, arXiv 2208.12242, Sec. 3.3),
sampled by the base model before training when ``class_data_root`` holds too few.

1. The folder is listed on every rank; it needs ``num_class_images - (images present)`` more
   (images of any name count, so a pre-generated set is used as it is). Those are the first
   missing indices i in ``0..num_class_images-1``, each written as ``class_{i:05d}.png``.
2. Every rank has listed the folder before any writes (a barrier). The indices fall into blocks
   ``[b * batch_size, (b + 1) * batch_size)``; rank r takes the blocks b with b % world_size == r.
3. Image i comes from DDIM + CFG on ``prompt.format(class_word)`` starting from noise seeded
   with ``base_seed + i`` (``ldm.txt2img``). A batch is always a whole block (cut after the last
   index needed), also when some of its images exist already (they are sampled again, not
   written), so the set is the same byte for byte for any rank count or interruption; another
   batch size may differ by the float rounding of batched kernels (a pixel by one level).
   Files are written atomically as soon as their batch is done, with
   the prompt and seed in the PNG text chunks; a restarted run makes only what is still missing
   (temporaries a killed run left are removed first, ``core.weights.remove_stale_temporaries``).
4. SIGTERM, SIGUSR1 or Ctrl-C (``core.signals``) stop the generation when the batch in flight is
   written: ``core.cli.Stopped``, one line saying how many images are there (main.py: exit status 1).
5. A barrier, then training starts (the data sets are built after ``on_fit_start``).

``precision`` (diffusers' ``prior_generation_precision``): fp32 samples as before, under the trainer's
own forward context; fp16 / bf16 sample under ``torch.autocast`` with that dtype (fp16 needs CUDA,
bf16 autocast runs on CPU too).

With ``concepts`` (``dreambooth.concepts``, ``ldm.data.concepts``), every concept's class folder is
filled this way, with its class word, ``num_class_images`` (default: this callback's) and its
``class_prompt`` when it has one; concepts that share a folder fill it once.

The EMA weights are used when the model keeps them; the model's mode and the global RNG are left
as they were.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from tqdm import tqdm

from core.cli import Stopped
from core.config import DTYPES
from core.images import list_images, save_png
from core.signals import StopSignals
from core.weights import remove_stale_temporaries
from ldm.data.concepts import parse_concepts
from ldm.data.personalized import fill_template
from ldm.txt2img import sampling_mode, trained_resolution, txt2img

CLASS_FILE = "class_{:05d}.png"


def missing_indices(root: str | os.PathLike, num_images: int) -> list[int]:
    """The indices still to make: as many as the folder lacks, the first whose file is absent."""
    root = Path(root)
    have = len(list_images(root)) if root.is_dir() else 0
    absent = [i for i in range(num_images) if not (root / CLASS_FILE.format(i)).exists()]
    return absent[:max(num_images - have, 0)]


@dataclass(frozen=True)
class ClassSet:
    """One folder to fill: ``num_images`` class images of ``class_word``, sampled from ``prompt``."""

    root: str
    class_word: str | None
    num_images: int
    prompt: str


def blocks(indices: Sequence[int], size: int) -> list[tuple[list[int], list[int]]]:
    """(the batch to sample, the indices of it to write) for each block of ``indices`` (module notes, 3)."""
    wanted: dict[int, list[int]] = {}
    for i in indices:
        wanted.setdefault(i // size, []).append(i)
    end = max(indices, default=-1) + 1
    return [(list(range(b * size, min((b + 1) * size, end))), todo) for b, todo in wanted.items()]


class ClassImageSampler(pl.Callback):
    """Generates the missing class images in ``on_fit_start`` (see the module notes).

    ``class_data_root`` None: no prior preservation, nothing to do. ``resolution`` None: the model's
    training resolution (latent ``image_size`` times the VAE factor). ``concepts`` (not None): their
    class folders instead of ``class_data_root`` and ``class_word``.
    """

    def __init__(self, class_data_root: str | None, class_word: str | None, num_class_images: int = 100,
                 base_seed: int = 0, ddim_steps: int = 50, scale: float = 7.5, eta: float = 0.0,
                 batch_size: int = 4, prompt: str = "a photo of a {}", resolution: int | None = None,
                 negative_prompt: str = "", precision: str = "fp32", concepts: Sequence[Mapping] | None = None):
        if num_class_images < 0 or batch_size < 1 or ddim_steps < 1:
            raise ValueError(f"ClassImageSampler: num_class_images={num_class_images}, batch_size="
                             f"{batch_size}, ddim_steps={ddim_steps}: expected >= 0, >= 1, >= 1")
        if "{}" not in prompt:
            raise ValueError(f"ClassImageSampler: prompt {prompt!r} needs a '{{}}' for the class word")
        if precision not in DTYPES:
            raise ValueError(f"ClassImageSampler: precision={precision!r}: expected one of {', '.join(DTYPES)}")
        self.class_data_root, self.class_word = class_data_root, class_word
        self.num_class_images, self.base_seed, self.batch_size = num_class_images, base_seed, batch_size
        self.ddim_steps, self.scale, self.eta = ddim_steps, scale, eta
        self.prompt, self.resolution, self.negative_prompt = prompt, resolution, negative_prompt
        self.precision = precision
        self.concepts = parse_concepts(concepts)
        self._stops = StopSignals()

    def class_sets(self) -> list[ClassSet]:
        """The folders to fill: ``class_data_root``, or each concept's (one entry a folder)."""
        if self.concepts is None:
            if self.class_data_root is None:
                return []
            return [ClassSet(self.class_data_root, self.class_word, self.num_class_images,
                             self.prompt.format(self.class_word))]
        sets: dict[str, ClassSet] = {}
        for c in self.concepts:
            if c.class_data_root is None:
                continue
            num = c.num_class_images if c.num_class_images is not None else self.num_class_images
            if c.class_data_root in sets:  # a shared folder (same class word and prompt): the larger count
                num = max(num, sets[c.class_data_root].num_images)
            prompt = fill_template(c.class_prompt, None, c.class_word) if c.class_prompt else None
            sets[c.class_data_root] = ClassSet(c.class_data_root, c.class_word, num,
                                               prompt or self.prompt.format(c.class_word))
        return list(sets.values())

    def autocast(self, device: torch.device) -> ContextManager:
        """fp32: nothing added (the trainer's context decides, as before); fp16 / bf16: torch.autocast."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        if self.precision == "fp16" and device.type == "cpu":
            raise ValueError("ClassImageSampler: precision=fp16 needs a CUDA device; on CPU use bf16 or fp32")
        return torch.autocast(device.type, dtype=DTYPES[self.precision])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        class_sets = self.class_sets()
        if not class_sets:
            return
        autocast = self.autocast(pl_module.device)  # a wrong precision fails before any work
        todo = [(s, missing_indices(s.root, s.num_images)) for s in class_sets]
        for s, missing in todo:
            if missing and s.class_word is None:
                raise ValueError(f"{s.root}: {len(missing)} class images are missing and no class word "
                                 "was given to generate them (pass --class_word, e.g. --class_word dog)")
        trainer.strategy.barrier()  # every rank has listed the folders before anyone writes to them
        for s, missing in todo:
            if trainer.global_rank == 0:
                remove_stale_temporaries(s.root)
            if missing:
                rank_zero_info(f"{s.root}: generating {len(missing)} class images of {s.prompt!r}")
            mine = [i for i in missing if (i // self.batch_size) % trainer.world_size == trainer.global_rank]
            if mine:
                with self._stops, trainer.precision_plugin.forward_context(), autocast, sampling_mode(pl_module):
                    self.generate(pl_module, mine, progress=trainer.global_rank == 0, class_set=s)
        trainer.strategy.barrier()

    def generate(self, model: Any, indices: Sequence[int], progress: bool = False,
                 class_set: ClassSet | None = None) -> list[Path]:
        """Make and write class images ``indices`` of ``class_set`` (default: the one of
        ``class_data_root``), inside ``sampling_mode``."""
        class_set = class_set or self.class_sets()[0]
        root, prompt = Path(class_set.root), class_set.prompt
        resolution = self.resolution or trained_resolution(model)
        written = []
        with tqdm(total=len(indices), desc="class images", disable=not progress) as bar:
            for batch, todo in blocks(indices, self.batch_size):
                seeds = [self.base_seed + i for i in batch]
                images = txt2img(model, [prompt] * len(batch), seeds, resolution, resolution, self.ddim_steps,
                                 self.scale, self.eta, self.negative_prompt)
                for i, seed, image in zip(batch, seeds, images):
                    if i not in todo:
                        continue
                    info = dict(prompt=prompt, negative_prompt=self.negative_prompt, seed=seed, index=i,
                                sampler="ddim", steps=self.ddim_steps, scale=self.scale, eta=self.eta,
                                resolution=resolution)
                    written.append(save_png(image, root / CLASS_FILE.format(i), info))
                bar.update(len(todo))
                if self._stops.received is not None:
                    raise Stopped(f"{self._stops.name}: stopped while generating class images: "
                                  f"{len(list_images(root))} of {class_set.num_images} are in {root}; "
                                  "run the same command again to continue")
        return written
