"""The Lightning DataModule of ``main.py`` (CompVis ``DataModuleFromConfig``), made resumable.

Data sets are built lazily in ``train_dataloader()``, not in ``setup()``: the data they read may
be made by a callback in ``on_fit_start`` (DreamBooth's class images), after setup and before the
fit loop asks for data. Subclasses change ``train_dataset()`` (DreamBooth pairs instance and class
images) or ``collate`` (BLIP-2's caption batches).

The order comes from a :class:`ResumableSampler` (sharded by rank; a data set whose
``epoch_indexed`` is true gets epoch-numbered indices to seed its augmentations with; Lightning's automatic
``DistributedSampler`` must be off: ``Trainer(use_distributed_sampler=False)``). Its state, the
epoch and the samples consumed by the finished batches, is saved in every checkpoint through
``state_dict()``, so a run resumed mid-epoch sees exactly the batches the uninterrupted run saw.
Each DataLoader has its own ``torch.Generator``: creating its iterator would otherwise draw a
seed from the global torch RNG and shift the training noise of a resumed run.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch.utils.data import DataLoader, Dataset

from core.config import instantiate_from_config
from core.data.sampler import ResumableSampler


class DataModuleFromConfig(pl.LightningDataModule):
    """Builds ``train`` and ``validation`` from ``{target, params}`` data set configs and feeds their
    items as they are (``collate``: None for torch's default)."""

    collate: Callable[[list], Any] | None = None

    def __init__(self, batch_size: int, num_workers: int = 0, train: Mapping | None = None,
                 validation: Mapping | None = None, seed: int = 0, shuffle: bool = True):
        super().__init__()
        if train is None:
            raise ValueError("data.params.train: expected a {target, params} data set config")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.shuffle = shuffle
        self.configs = {"train": train, "validation": validation}
        self.sampler: ResumableSampler | None = None
        self._sampler_state: dict[str, Any] | None = None
        if validation is not None:
            self.val_dataloader = self._val_dataloader

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataset(self) -> Dataset:
        return instantiate_from_config(self.configs["train"])

    def _loader(self, dataset: Dataset, sampler: ResumableSampler) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed), drop_last=False,
                          collate_fn=self.collate)

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        rank, world = self._rank()
        self.sampler = ResumableSampler(len(dataset), self.seed, self.shuffle, num_replicas=world, rank=rank,
                                        epoch_index=getattr(dataset, "epoch_indexed", False))
        if self._sampler_state is not None:
            self.sampler.load_state_dict(self._sampler_state)
            self._sampler_state = None
        elif self.trainer is not None and self.trainer.global_step > 0:
            rank_zero_warn(f"the checkpoint holds no data order for {type(self).__qualname__} (saved by another "
                           "data module class?): the resumed run starts its epoch's order from the beginning")
        return self._loader(dataset, self.sampler)

    def _val_dataloader(self) -> DataLoader:
        dataset = instantiate_from_config(self.configs["validation"])
        rank, world = self._rank()
        return self._loader(dataset, ResumableSampler(len(dataset), self.seed, False, num_replicas=world, rank=rank))

    def state_dict(self) -> dict[str, Any]:
        """The sampler state after the batches of this epoch that finished (all ranks together)."""
        if self.sampler is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"sampler": self.sampler.state_dict(done * self.batch_size * self.trainer.world_size)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Kept until ``train_dataloader()`` builds the sampler."""
        self._sampler_state = state.get("sampler")
