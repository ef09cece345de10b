"""DreamBooth's DataModule: the core resumable ``DataModuleFromConfig`` with the instance set paired
with the class images (``DreamBoothPairs``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf
from torch.utils.data import Dataset

from core.config import instantiate_from_config
from core.data.datamodule import DataModuleFromConfig as CoreDataModule
from core.images import list_images
from ldm.data.personalized import DreamBoothPairs


def _without_empty_class_images(class_images: Mapping | None) -> Mapping | None:
    """A class-image entry whose ``data_root`` is null means: no prior preservation."""
    if class_images is None or (class_images.get("params") or {}).get("data_root") is None:
        return None
    return class_images


class DreamBoothDataModule(CoreDataModule):
    """Builds ``train`` (the instance images), ``class_images`` and ``validation`` from ``{target, params}``
    configs; training batches are ``DreamBoothPairs``. (A plain latent-diffusion run, with flat batches
    ``{"image", "caption"}``, takes core's ``DataModuleFromConfig``.)"""

    def __init__(self, batch_size: int, num_workers: int = 0, train: Mapping | None = None,
                 class_images: Mapping | None = None, validation: Mapping | None = None, seed: int = 0,
                 shuffle: bool = True):
        super().__init__(batch_size, num_workers, train=train, validation=validation, seed=seed, shuffle=shuffle)
        self.configs["class_images"] = _without_empty_class_images(class_images)

    def train_dataset(self) -> Dataset:
        """The instance data set, paired with the class images."""
        instance = super().train_dataset()
        class_images = self.configs["class_images"]
        return DreamBoothPairs(instance, instantiate_from_config(class_images) if class_images is not None else None)

    @staticmethod
    def check_config(config: Any) -> None:
        """Before anything is built (``core.trainer`` asks): the DreamBooth data of the config."""
        root = OmegaConf.select(config, "data.params.train.params.data_root")
        if root is None:
            raise ValueError("--data_root is required: the folder of instance images (dreambooth.data_root)")
        if not Path(root).is_dir():
            raise ValueError(f"--data_root {root}: no such folder (expected the instance images)")
        if not list_images(root):
            raise ValueError(f"--data_root {root}: the folder holds no images (.jpg, .png, ...)")
        class_root = OmegaConf.select(config, "data.params.class_images.params.data_root")
        if class_root is not None and not OmegaConf.select(config, "data.params.class_images.params.class_word"):
            raise ValueError(f"--class_word is required with --reg_data_root {class_root}: class images are "
                             "generated and captioned as 'a photo of a <class_word>'")
