"""The one loader of the BLIP-2 family: ``load_blip2(source, ...) -> (network, image processor)``,
used by ``scripts/caption.py``, ``scripts/retrieve.py`` and ``blip2.export``.

``network`` names the network wanted: ``Blip2OPT`` (captioning, VQA; the default) or
``Blip2Qformer`` (stage 1, retrieval). ``source`` is one of:

1. a Hugging Face folder: ``network.from_pretrained`` (``blip2.hub`` / ``blip2.stage1_weights``),
   the image processor from its ``preprocessor_config.json`` when it has one;
2. a weight file with ``config`` (a YAML path or a loaded config) whose ``model`` builds the
   network, or one of our systems that holds it as ``.model`` (``Blip2OPTFinetune``,
   ``Blip2Stage1``; e.g. the config ``main.py`` saved in the run folder). It is built on the meta
   device without its start weights (an HF folder's tensors, ``vision_weights``,
   ``bert_weights``); the file holds the network's keys (``.safetensors``, a ``state_dict``) or is
   a Lightning checkpoint of a system (``state_dict`` ``model.*``), and loads strictly;
3. a Lightning checkpoint of ``Blip2OPTFinetune`` alone: self-describing (``blip2_config``), with
   the tokenizer from the folder ``tokenizer``, else from the folder the checkpoint names
   (``blip2_tokenizer``: the one it was trained with);
4. a LAVIS checkpoint (``{"model": ...}``) with the EVA ViT file ``vit`` (unless it holds its own
   ViT) and, for ``Blip2OPT``, the OPT folder ``opt`` (``blip2.lavis``); with ``config``, into the
   network that config builds, else into BLIP-2's architecture sized from the files.

A lean training checkpoint (``core.lean``: 2. and 3.) is completed from the Hugging Face folder it
refers to (``base``: where that folder is now, when it was moved), its content checked first.
Weight files are read with ``core.weights`` (``weights_only``; one-line errors naming the file).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning.pytorch as pl
import torch
from torch import nn

from blip2.hub import TIED, assign_weights, load_pretrained, load_tokenizer
from blip2.lavis import load_lavis_opt, load_lavis_stage1
from blip2.modules.blip2_opt import Blip2OPT
from blip2.modules.blip2_qformer import Blip2Qformer
from blip2.processors import PREPROCESSOR_FILE, Blip2ImageProcessor
from blip2.stage1_weights import load_retrieval_folder
from core.config import instantiate_from_config, load_config
from core.lean import BASE_KEY, check_base
from core.weights import (SAFETENSORS_SUFFIXES, CheckpointError, load_checkpoint, load_strict, open_folder,
                          raise_mismatch, weights_of)

MODEL_PREFIX = "model."  # our systems hold their network as ``self.model``
START_WEIGHTS = ("vision_weights", "bert_weights")  # Blip2Stage1's: the weight file replaces them
TOKENIZER_ENTRY = "blip2_tokenizer"  # a Blip2OPTFinetune checkpoint's: the folder of its tokenizer


def build_blip2_opt(config: Mapping[str, Any], tokenizer: str | None = None) -> Blip2OPT:
    """YAML target: a ``Blip2OPT`` with random weights, on the current default device. ``config``:
    a ``Blip2Config`` dict, or ``target``/``params`` of a function that returns one (e.g.
    ``blip2.config.blip2_opt_2_7b``); ``tokenizer``: a folder with tokenizer files."""
    cfg = instantiate_from_config(config) if "target" in config else dict(config)
    tok = _tokenizer(tokenizer) if tokenizer else None
    return Blip2OPT.from_config(cfg, device=torch.get_default_device(), **({"tokenizer": tok} if tok else {}))


def load_blip2(source: str | os.PathLike, config: str | os.PathLike | Mapping | None = None,
               network: type[nn.Module] = Blip2OPT, tokenizer: str | os.PathLike | None = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               image_size: int | None = None, vit: str | os.PathLike | None = None,
               opt: str | os.PathLike | None = None,
               base: str | os.PathLike | None = None) -> tuple[nn.Module, Blip2ImageProcessor]:
    """(network in eval mode on ``device``, its image processor) from ``source`` (see the module
    notes). ``dtype``: a ``Blip2OPT``'s precision (ViT, projection, OPT; the Q-Former stays fp32);
    ``image_size``: the input resolution when it differs from the config's (e.g. the 364 px of
    caption fine-tuning); ``vit``, ``opt``: the EVA ViT file and OPT folder of a LAVIS checkpoint;
    ``base``: a lean training checkpoint's base folder, when it was moved (its content is checked).
    Bad input raises a one-line ``ValueError`` naming the file."""
    if network not in (Blip2OPT, Blip2Qformer):
        raise ValueError(f"load_blip2: network must be Blip2OPT or Blip2Qformer, got {network!r}")
    if network is Blip2Qformer and dtype != torch.float32:
        raise ValueError(f"load_blip2: a Blip2Qformer is read in float32, got dtype {dtype}")
    source = Path(source)
    if base is not None and (source.is_dir() or vit is not None or opt is not None):
        raise ValueError(f"{source}: a base folder ({base}) completes a lean training checkpoint of ours, "
                         "not a Hugging Face folder or a LAVIS file")
    if source.is_dir():
        model = _from_folder(network, source, dtype, device)
    elif not source.is_file():
        raise CheckpointError(f"{source}: no such model folder or checkpoint file")
    elif vit is not None or opt is not None or is_lavis_checkpoint(source):
        model = _from_lavis(network, source, vit, opt, config, tokenizer, dtype, device)
    elif config is not None:
        model = _from_config(network, source, config, dtype, device, base)
    else:
        model = _from_training_checkpoint(network, source, tokenizer, dtype, device, base)
    if model.tokenizer is None:
        raise ValueError(f"{config or source}: the model has no tokenizer (tokenizer files / params.tokenizer)")
    if image_size is not None:
        model.image_size = image_size
    if source.is_dir() and image_size is None and (source / PREPROCESSOR_FILE).is_file():
        return model.eval(), Blip2ImageProcessor.from_folder(source)
    return model.eval(), Blip2ImageProcessor(model.image_size, model.image_mean, model.image_std)


def network_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's weights: a Lightning checkpoint of a system holds them as ``model.*``."""
    if not any(key.startswith(MODEL_PREFIX) for key in state):
        return dict(state)
    return {key.removeprefix(MODEL_PREFIX): value for key, value in state.items()}


def _tokenizer(folder: str | os.PathLike) -> Any:
    tok = load_tokenizer(Path(folder))
    if tok is None:
        raise ValueError(f"{folder}: no tokenizer files (tokenizer.json / vocab.json) in the folder")
    return tok


def _from_folder(network: type[nn.Module], folder: Path, dtype: torch.dtype, device: str | torch.device) -> Any:
    if network is Blip2Qformer:
        return load_retrieval_folder(Blip2Qformer, folder, device)
    return load_pretrained(Blip2OPT, folder, dtype, device)


def is_lavis_checkpoint(path: Path) -> bool:
    """A LAVIS ``.pth`` file: ``{"model": state_dict}`` (ours hold ``state_dict``); memory-mapped, so
    looking reads little."""
    if path.suffix in SAFETENSORS_SUFFIXES:
        return False
    obj = load_checkpoint(path, mmap=True)
    return isinstance(obj.get("model"), Mapping) and "state_dict" not in obj


def _from_lavis(network: type[nn.Module], source: Path, vit: str | os.PathLike | None,
                opt: str | os.PathLike | None, config: str | os.PathLike | Mapping | None,
                tokenizer: str | os.PathLike | None, dtype: torch.dtype, device: str | torch.device) -> Any:
    """A LAVIS checkpoint (``blip2.lavis``): into the network ``config`` builds, or BLIP-2's."""
    model = _build(network, config) if config is not None else None
    if network is Blip2Qformer:
        if opt is not None:
            raise ValueError(f"{source}: a stage-1 Blip2Qformer has no OPT; leave out the OPT folder {opt}")
        kwargs = {"tokenizer": str(tokenizer)} if tokenizer is not None and model is None else {}
        return load_lavis_stage1(source, vit, model, device, **kwargs)
    if opt is None:
        raise ValueError(f"{source}: a LAVIS BLIP-2 OPT checkpoint needs its OPT folder (facebook/opt-2.7b "
                         "layout: config.json, weights, tokenizer; --opt)")
    return load_lavis_opt(source, vit, opt, model, dtype, device)


def _load_weights(model: Any, source: Path, keys: set[str], get: Callable[[str], torch.Tensor],
                  dtype: torch.dtype, device: str | torch.device) -> Any:
    """Strictly load the tensors ``get(key)`` of ``keys`` into ``model`` (built on the meta device)."""
    if isinstance(model, Blip2Qformer):
        model = model.to_empty(device=device)
        load_strict(model, {key: get(key) for key in keys}, str(source))
        return model
    return assign_weights(model.set_precision(dtype), str(source), keys, get, device)


def _load_checkpoint_weights(model: Any, source: Path, obj: Mapping[str, Any], dtype: torch.dtype,
                             device: str | torch.device, base: str | os.PathLike | None) -> Any:
    """A read checkpoint's weights (``model.*`` or the network's keys) into ``model``; a lean one's
    left-out keys from its checked base folder (``core.lean``)."""
    state = network_state(weights_of(obj, str(source)))
    reference = obj.get(BASE_KEY)
    if reference is None:
        if base is not None:
            raise CheckpointError(f"{source}: --base_weights {base} given, but the checkpoint is complete "
                                  "(it refers to no base folder)")
        return _load_weights(model, source, set(state), state.__getitem__, dtype, device)
    folder, readers = open_folder(check_base(reference, str(source), base))
    left_out = {key.removeprefix(MODEL_PREFIX) for key in reference["keys"]}
    absent = [k for k in sorted(left_out) if k not in readers and not (k in TIED and set(TIED) & set(readers))]
    raise_mismatch(folder, f"the base of {source}", absent, [])

    def get(key: str) -> torch.Tensor:
        return state[key] if key in state else readers[key]()

    return _load_weights(model, source, set(state) | {k for k in left_out if k in readers}, get, dtype, device)


def _from_config(network: type[nn.Module], source: Path, config: str | os.PathLike | Mapping,
                 dtype: torch.dtype, device: str | torch.device, base: str | os.PathLike | None) -> Any:
    model = _build(network, config)
    return _load_checkpoint_weights(model, source, load_checkpoint(source, mmap=True), dtype, device, base)


def _build(network: type[nn.Module], config: str | os.PathLike | Mapping) -> Any:
    """The network ``config``'s ``model`` builds, on the meta device without its start weights."""
    model_config = (load_config([config]) if isinstance(config, (str, os.PathLike)) else config).get("model")
    if model_config is None:
        raise KeyError(f"{config}: the config has no 'model' section")
    params = dict(model_config.get("params") or {})
    params.update({key: None for key in START_WEIGHTS if key in params})
    with torch.device("meta"):
        built = instantiate_from_config({"target": model_config["target"], "params": params})
    model = built.model if isinstance(built, pl.LightningModule) else built
    if not isinstance(model, network):
        raise ValueError(f"{config}: 'model' builds a {type(built).__name__}, expected a {network.__name__} "
                         "or a system that holds one")
    return model


def _from_training_checkpoint(network: type[nn.Module], source: Path, tokenizer: str | os.PathLike | None,
                              dtype: torch.dtype, device: str | torch.device,
                              base: str | os.PathLike | None) -> Blip2OPT:
    """A ``Blip2OPTFinetune`` checkpoint: its ``blip2_config`` and ``state_dict`` (``model.*``)."""
    obj = load_checkpoint(source, mmap=True)
    if network is not Blip2OPT or "blip2_config" not in obj or "state_dict" not in obj:
        raise CheckpointError(f"{source}: not a Blip2OPTFinetune checkpoint (no 'blip2_config' / 'state_dict'); "
                              "give the config that builds its model")
    model = Blip2OPT.from_config(obj["blip2_config"], device="meta", tokenizer=_checkpoint_tokenizer(obj, source,
                                                                                                     tokenizer))
    return _load_checkpoint_weights(model, source, obj, dtype, device, base)


def _checkpoint_tokenizer(obj: Mapping[str, Any], source: Path, tokenizer: str | os.PathLike | None) -> Any:
    """The tokenizer of a training checkpoint: the folder ``tokenizer``, else the one it names."""
    if tokenizer is not None:
        return _tokenizer(tokenizer)
    recorded = obj.get(TOKENIZER_ENTRY)
    if recorded is None:
        raise ValueError(f"{source}: the checkpoint names no tokenizer folder; give one (--tokenizer) or its config")
    if not Path(recorded).is_dir():
        raise ValueError(f"{source}: its tokenizer folder {recorded} (from training) is gone; give one (--tokenizer)")
    return _tokenizer(recorded)
