"""Sample grids of validation prompts during training, on disk and in TensorBoard.

Every ``every_n_steps`` optimizer steps (and at the end of a run that was not stopped early), rank 0 samples
``n_per_prompt`` images of each prompt, sample j from seed ``seed + j`` for every prompt, so a row
of the grid is one prompt and a column one starting noise, comparable across steps. Written to
``<logdir>/images/step-XXXXXX/`` (one PNG per sample, with its prompt and seed, and ``grid.png``)
and to every logger whose ``experiment`` has ``add_image`` (TensorBoard). The sampling uses the EMA
weights when there are any, and leaves the model's mode and the global RNG as they were.

With ``concepts`` (``dreambooth.concepts``, ``ldm.data.concepts``), the prompts are
``concept_prompts`` filled with each concept's identifier and class word, concept by concept (a
prompt two concepts share, such as their common class, once).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np

from core.images import make_grid, save_png
from ldm.data.concepts import Concept, parse_concepts
from ldm.data.personalized import CLASS_TEMPLATE, INSTANCE_TEMPLATE, fill_template
from ldm.txt2img import sampling_mode, trained_resolution, txt2img


def concept_prompt_list(concepts: Sequence[Concept], templates: Sequence[str]) -> list[str]:
    """Each template filled per concept, concept-major, every prompt once."""
    if isinstance(templates, str) or not templates:
        raise ValueError(f"ImageLogger: concept_prompts={templates!r}: expected a non-empty list of templates")
    filled = [fill_template(t, c.identifier, c.class_word) for c in concepts for t in templates]
    return list(dict.fromkeys(filled))


class ImageLogger(pl.Callback):
    """``logdir`` None: main.py sets the run's log dir (else the trainer's ``default_root_dir``);
    ``resolution`` None: the model's training resolution. Sampling: DDIM, ``ldm.txt2img``."""

    def __init__(self, every_n_steps: int = 200, prompts: Sequence[str] = ("a photo of sks dog", "a photo of a dog"),
                 ddim_steps: int = 50, scale: float = 7.5, seed: int = 0, n_per_prompt: int = 2,
                 logdir: str | None = None, eta: float = 0.0, negative_prompt: str = "",
                 resolution: int | None = None, log_at_end: bool = True, concepts: Sequence[Mapping] | None = None,
                 concept_prompts: Sequence[str] = (INSTANCE_TEMPLATE, CLASS_TEMPLATE)):
        prompts = concept_prompt_list(parse_concepts(concepts), concept_prompts) if concepts is not None else prompts
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"ImageLogger: prompts={prompts!r}: expected a non-empty list of prompts")
        if every_n_steps < 1 or n_per_prompt < 1 or ddim_steps < 1:
            raise ValueError(f"ImageLogger: every_n_steps={every_n_steps}, n_per_prompt={n_per_prompt}, "
                             f"ddim_steps={ddim_steps}: expected positive integers")
        self.every_n_steps, self.prompts, self.n_per_prompt = every_n_steps, list(prompts), n_per_prompt
        self.ddim_steps, self.scale, self.seed, self.eta = ddim_steps, scale, seed, eta
        self.logdir, self.negative_prompt, self.log_at_end = logdir, negative_prompt, log_at_end
        self.resolution = resolution
        self.last_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.log_images(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Skipped when a signal or a callback stopped the run early: a preempted job saves first."""
        if self.log_at_end and not trainer.should_stop and trainer.global_step != self.last_step:
            self.log_images(trainer, pl_module)

    def sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> np.ndarray:
        """(len(prompts) * n_per_prompt, H, W, 3) uint8, prompt-major."""
        prompts = [p for p in self.prompts for _ in range(self.n_per_prompt)]
        seeds = [self.seed + j for _ in self.prompts for j in range(self.n_per_prompt)]
        with trainer.precision_plugin.forward_context(), sampling_mode(pl_module):
            resolution = self.resolution or trained_resolution(pl_module)
            return txt2img(pl_module, prompts, seeds, resolution, resolution, self.ddim_steps, self.scale,
                           self.eta, self.negative_prompt)

    def log_images(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Sample, write the PNGs and the grid, send the grid to the loggers; rank 0 only."""
        step = self.last_step = trainer.global_step
        if trainer.global_rank != 0:
            return None
        images = self.sample(trainer, pl_module)
        folder = Path(self.logdir or trainer.default_root_dir) / "images" / f"step-{step:06d}"
        for k, image in enumerate(images):
            prompt, j = self.prompts[k // self.n_per_prompt], k % self.n_per_prompt
            save_png(image, folder / f"{k:03d}.png", dict(prompt=prompt, seed=self.seed + j, step=step,
                                                         steps=self.ddim_steps, scale=self.scale, eta=self.eta))
        grid = make_grid(images, nrow=self.n_per_prompt, labels=self.prompts)
        save_png(grid, folder / "grid.png", dict(prompts=self.prompts, seed=self.seed, step=step))
        for logger in trainer.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_image"):
                logger.experiment.add_image("samples", grid, step, dataformats="HWC")
        return folder / "grid.png"
