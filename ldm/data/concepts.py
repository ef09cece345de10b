"""Several DreamBooth subjects in one run: the config's ``dreambooth.concepts``.

A concept is one subject: its photos, identifier and class word, and the class images of its prior
preservation. ``dreambooth.concepts: null`` means the one concept that ``dreambooth.*`` describes
(the single-subject command line, ``--data_root --reg_data_root --class_word --token``). A list
gives several, each a mapping with these keys:

    data_root         required: the subject's photos
    identifier        required: its rare token, e.g. sks; no two concepts share one
    class_word        required: its class noun, e.g. dog
    class_data_root   its class images, the missing ones sampled before training (null: no prior
                      preservation; every concept has a class folder or none has). Concepts may
                      share a folder when they share the class word and class prompt.
    num_class_images  default: dreambooth.num_class_images
    instance_prompt   caption template of its photos, with {identifier} (and {class_word}); default:
                      the train set's templates
    class_prompt      caption template of its class images and the prompt that samples them, with
                      {class_word}; default: the class set's templates and the class_images
                      callback's prompt
    repeats           default: the train set's repeats

The data module (``ldm.data.datamodule``) builds one instance set and one class set per concept,
each photo paired with a class image of its own concept; the class-image callback fills each
concept's class folder; the image logger samples prompts per concept.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from core.images import list_images

KEY = "dreambooth.concepts"
REQUIRED = ("data_root", "identifier", "class_word")


@dataclass(frozen=True)
class Concept:
    """One subject of a DreamBooth run (see the module notes for the keys)."""

    data_root: str
    identifier: str
    class_word: str
    class_data_root: str | None = None
    num_class_images: int | None = None
    instance_prompt: str | None = None
    class_prompt: str | None = None
    repeats: int | None = None


KEYS = tuple(f.name for f in fields(Concept))
TEXT_KEYS = ("data_root", "identifier", "class_word", "class_data_root", "instance_prompt", "class_prompt")


def _plain(value: Any) -> Any:
    """OmegaConf nodes as plain lists and dicts (interpolations resolved)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _name(k: int, entry: Mapping) -> str:
    """``dreambooth.concepts[1] (zwx)``: the position, and the identifier when there is one."""
    identifier = entry.get("identifier")
    return f"{KEY}[{k}]" + (f" ({identifier})" if isinstance(identifier, str) and identifier else "")


def _check_values(name: str, entry: Mapping) -> None:
    for key in TEXT_KEYS:
        if entry.get(key) is not None and (not isinstance(entry[key], str) or not entry[key].strip()):
            raise ValueError(f"{name}: {key}={entry[key]!r}, expected a non-empty string")
    for key, least in (("num_class_images", 0), ("repeats", 1)):
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ValueError(f"{name}: {key}={value!r}, expected an integer >= {least}")
    if entry.get("instance_prompt") is not None and "{identifier}" not in entry["instance_prompt"]:
        raise ValueError(f"{name}: instance_prompt {entry['instance_prompt']!r} has no {{identifier}} "
                         "(the photos' captions must name the subject)")
    if entry.get("class_prompt") is not None and "{identifier}" in entry["class_prompt"]:
        raise ValueError(f"{name}: class_prompt {entry['class_prompt']!r} names the {{identifier}} "
                         "(class images show the class, not the subject)")


def _concept(k: int, entry: Any) -> Concept:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{KEY}[{k}]: expected a mapping with {', '.join(REQUIRED)} (...), got {entry!r}")
    name = _name(k, entry)
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise ValueError(f"{name}: unknown key {unknown[0]!r} (the keys of a concept: {', '.join(KEYS)})")
    missing = [key for key in REQUIRED if entry.get(key) is None]
    if missing:
        raise ValueError(f"{name}: missing {missing[0]!r} (every concept needs {', '.join(REQUIRED)})")
    _check_values(name, entry)
    return Concept(**entry)


def _first_repeat(concepts: Sequence[Concept], key: str) -> tuple[int, int] | None:
    seen: dict[str, int] = {}
    for k, concept in enumerate(concepts):
        value = getattr(concept, key)
        if value in seen:
            return seen[value], k
        seen[value] = k
    return None


def _check_together(concepts: Sequence[Concept]) -> None:
    """No shared identifier or photo folder; class folders for all or none, shared only by equal classes."""
    for key, why in (("identifier", "each concept needs its own"), ("data_root", "each concept has its own photos")):
        pair = _first_repeat(concepts, key)
        if pair is not None:
            a, b = pair
            raise ValueError(f"{KEY}[{a}] and [{b}]: the same {key} {getattr(concepts[a], key)!r} ({why})")
    with_class = [c.class_data_root is not None for c in concepts]
    if any(with_class) and not all(with_class):
        k = with_class.index(False)
        raise ValueError(f"{KEY}[{k}] ({concepts[k].identifier}): no class_data_root, while other concepts "
                         "have one (prior preservation for every concept or for none)")
    by_folder: dict[str, Concept] = {}
    for k, c in enumerate(concepts):
        if c.class_data_root is None:
            continue
        first = by_folder.setdefault(c.class_data_root, c)
        if (first.class_word, first.class_prompt) != (c.class_word, c.class_prompt):
            raise ValueError(f"{KEY}[{k}] ({c.identifier}): class_data_root {c.class_data_root} is also the class "
                             f"folder of {first.identifier} with another class word or class prompt")


def parse_concepts(concepts: Any) -> list[Concept] | None:
    """``dreambooth.concepts`` checked: None (the one concept of ``dreambooth.*``) or a list of concepts."""
    concepts = _plain(concepts)
    if concepts is None:
        return None
    if isinstance(concepts, (str, Mapping)) or not isinstance(concepts, Sequence) or not concepts:
        raise ValueError(f"{KEY}: expected null or a non-empty list of concepts (each with "
                         f"{', '.join(REQUIRED)}), got {concepts!r}")
    parsed = [_concept(k, entry) for k, entry in enumerate(concepts)]
    _check_together(parsed)
    return parsed


def check_photo_folder(where: str, root: str) -> None:
    """The folder of a subject's photos exists and holds images (``where`` names its setting)."""
    if not Path(root).is_dir():
        raise ValueError(f"{where} {root}: no such folder (expected the subject's photos)")
    if not list_images(root):
        raise ValueError(f"{where} {root}: the folder holds no images (.jpg, .png, ...)")


def check_photo_folders(concepts: Sequence[Concept]) -> None:
    """Every concept's ``data_root`` is a folder that holds images (before anything is built)."""
    for k, c in enumerate(concepts):
        check_photo_folder(f"{KEY}[{k}] ({c.identifier}): data_root", c.data_root)
