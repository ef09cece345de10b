"""DreamBooth's DataModule: the core resumable ``DataModuleFromConfig`` with the instance set paired
with the class images (``DreamBoothPairs``), for one subject or several (``ldm.data.concepts``)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import ConcatDataset, Dataset

from core.config import instantiate_from_config
from core.data.datamodule import DataModuleFromConfig as CoreDataModule
from ldm.data.concepts import Concept, check_photo_folder, check_photo_folders, parse_concepts
from ldm.data.personalized import DreamBoothPairs

SINGLE_SUBJECT = (("data.params.train.params.data_root", "--data_root (dreambooth.data_root)"),
                  ("data.params.class_images.params.data_root", "--reg_data_root (dreambooth.class_data_root)"),
                  ("data.params.train.params.class_word", "--class_word (dreambooth.class_word)"))


def _without_empty_class_images(class_images: Mapping | None) -> Mapping | None:
    """A class-image entry whose ``data_root`` is null means: no prior preservation."""
    if class_images is None or (class_images.get("params") or {}).get("data_root") is None:
        return None
    return class_images


def with_params(config: Mapping, **params: Any) -> dict:
    """A ``{target, params}`` config with some params replaced (the others resolved as they were)."""
    config = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    return {"target": config["target"], "params": {**(config.get("params") or {}), **params}}


def concept_configs(concept: Concept, train: Mapping, class_images: Mapping | None) -> tuple[dict, dict | None]:
    """The instance and class data set configs of one concept: the ``train`` and ``class_images``
    configs with the concept's folders, words and, when it has them, prompts and repeats."""
    instance = {"data_root": concept.data_root, "identifier": concept.identifier, "class_word": concept.class_word}
    if concept.instance_prompt is not None:
        instance["templates"] = [concept.instance_prompt]
    if concept.repeats is not None:
        instance["repeats"] = concept.repeats
    if concept.class_data_root is None:
        return with_params(train, **instance), None
    if class_images is None:
        raise ValueError(f"dreambooth.concepts ({concept.identifier}): class_data_root {concept.class_data_root} "
                         "needs data.params.class_images, the config of the class images")
    classes = {"data_root": concept.class_data_root, "class_word": concept.class_word}
    if concept.class_prompt is not None:
        classes["templates"] = [concept.class_prompt]
    return with_params(train, **instance), with_params(class_images, **classes)


class DreamBoothDataModule(CoreDataModule):
    """Builds ``train`` (the instance images), ``class_images`` and ``validation`` from ``{target, params}``
    configs; training batches are ``DreamBoothPairs`` (halves ``{"image", "caption", "image_digest"}``).
    (A plain latent-diffusion run, with flat batches ``{"image", "caption"}``, takes core's
    ``DataModuleFromConfig``.)

    With ``concepts`` (``dreambooth.concepts``, see ``ldm.data.concepts``), ``train`` and
    ``class_images`` are the templates of each concept's two sets; the training set is the
    concatenation of the concepts' pairs, so a shuffled epoch draws from every concept in proportion
    to its items (photos times repeats), each photo with a class image of its own concept."""

    def __init__(self, batch_size: int, num_workers: int = 0, train: Mapping | None = None,
                 class_images: Mapping | None = None, validation: Mapping | None = None, seed: int = 0,
                 shuffle: bool = True, concepts: Sequence[Mapping] | None = None):
        super().__init__(batch_size, num_workers, train=train, validation=validation, seed=seed, shuffle=shuffle)
        self.configs["class_images"] = _without_empty_class_images(class_images)
        self.concepts = parse_concepts(concepts)
        self.class_template = class_images

    def train_dataset(self) -> Dataset:
        """The instance data set, paired with the class images (per concept, concatenated)."""
        if self.concepts is not None:
            return ConcatDataset([self.concept_pairs(c) for c in self.concepts])
        instance = super().train_dataset()
        class_images = self.configs["class_images"]
        return DreamBoothPairs(instance, instantiate_from_config(class_images) if class_images is not None else None)

    def concept_pairs(self, concept: Concept) -> DreamBoothPairs:
        instance, class_images = concept_configs(concept, self.configs["train"], self.class_template)
        return DreamBoothPairs(instantiate_from_config(instance),
                               instantiate_from_config(class_images) if class_images is not None else None)

    @staticmethod
    def check_config(config: Any) -> None:
        """Before anything is built (``core.trainer`` asks): the DreamBooth data of the config."""
        concepts = OmegaConf.select(config, "data.params.concepts")
        if concepts is not None:
            DreamBoothDataModule.check_concepts(config, concepts)
            return
        root = OmegaConf.select(config, "data.params.train.params.data_root")
        if root is None:
            raise ValueError("--data_root is required: the folder of instance images (dreambooth.data_root)")
        check_photo_folder("--data_root", root)
        class_root = OmegaConf.select(config, "data.params.class_images.params.data_root")
        if class_root is not None and not OmegaConf.select(config, "data.params.class_images.params.class_word"):
            raise ValueError(f"--class_word is required with --reg_data_root {class_root}: class images are "
                             "generated and captioned as 'a photo of a <class_word>'")

    @staticmethod
    def check_concepts(config: Any, concepts: Any) -> None:
        """Several subjects: the single-subject settings unset, every concept well-formed with photos."""
        for key, option in SINGLE_SUBJECT:
            value = OmegaConf.select(config, key)
            if value is not None:
                raise ValueError(f"{option} is {value!r} while dreambooth.concepts lists the subjects: give the "
                                 "subject as one more concept instead")
        parsed = parse_concepts(concepts)
        check_photo_folders(parsed)
        for concept in parsed:
            concept_configs(concept, config.data.params.train, OmegaConf.select(config, "data.params.class_images"))
