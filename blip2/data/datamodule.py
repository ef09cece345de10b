"""The BLIP-2 caption DataModule: ``ldm``'s resumable, rank-sharded ``DataModuleFromConfig`` with the
caption batches of ``blip2.data.captions.collate`` (reference lists of any length per image)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch.utils.data import DataLoader, Dataset

from blip2.data.captions import collate
from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.sampler import ResumableSampler


class CaptionDataModule(DataModuleFromConfig):
    """``train`` and ``validation``: ``{target, params}`` data set configs (e.g. ``CaptionDataset``)."""

    def __init__(self, batch_size: int, num_workers: int = 0, train: Mapping | None = None,
                 validation: Mapping | None = None, seed: int = 0, shuffle: bool = True):
        super().__init__(batch_size, num_workers, train=train, validation=validation, seed=seed, shuffle=shuffle,
                         paired=False)

    def _loader(self, dataset: Dataset, sampler: ResumableSampler) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed), collate_fn=collate)
