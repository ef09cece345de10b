"""The BLIP-2 caption DataModule: the core resumable, rank-sharded ``DataModuleFromConfig`` with the
caption batches of ``blip2.data.captions.collate`` (reference lists of any length per image)."""
from __future__ import annotations

from blip2.data.captions import collate
from core.data.datamodule import DataModuleFromConfig


class CaptionDataModule(DataModuleFromConfig):
    """``train`` and ``validation``: ``{target, params}`` data set configs (e.g. ``CaptionDataset``)."""

    collate = staticmethod(collate)
