"""Save a BLIP-2 OPT as a Hugging Face folder that ``Blip2OPT.from_pretrained`` and transformers'
``Blip2ForConditionalGeneration.from_pretrained`` both load.

The folder (the layout of the Hub's ``Salesforce/blip2-opt-*``):
1. ``config.json``: the ``Blip2Config`` fields (``model_type`` "blip-2" and its sub-config types);
2. ``model.safetensors``: the ``Blip2ForConditionalGeneration`` keys, without the output head tied
   to the token embedding (transformers does not store tied copies), ``format: pt`` metadata;
3. the tokenizer files (``save_pretrained`` of the model's tokenizer);
4. ``preprocessor_config.json``: ``BlipImageProcessor`` settings (size, mean, std, bicubic);
5. ``generation_config.json``: bos, eos ("\\n") and pad, and the model's ``generation_defaults``.

From a training checkpoint of ``Blip2OPTFinetune`` (``state_dict`` ``model.*`` plus ``blip2_config``),
read by ``blip2.loading.load_blip2``; bad input is one line on stderr and exit status 2:

    python -m blip2.export --ckpt logs/<run>/checkpoints/last.ckpt --tokenizer <hf folder> --out <folder>
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from blip2.config import normalize_config
from blip2.hub import GENERATION_FILE, TIED
from blip2.loading import load_blip2
from blip2.modules.blip2_opt import Blip2OPT
from core.cli import ArgumentParser, run_cli
from core.weights import atomic_path, save_checkpoint


def hf_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a ``Blip2ForConditionalGeneration`` with an OPT language model."""
    cfg = normalize_config(config)
    return {
        "architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2",
        "vision_config": {**cfg["vision_config"], "model_type": "blip_2_vision_model"},
        "qformer_config": {**cfg["qformer_config"], "model_type": "blip_2_qformer"},
        "text_config": cfg["text_config"], "num_query_tokens": cfg["num_query_tokens"],
        "image_token_index": cfg["image_token_index"], "use_decoder_only_language_model": True,
    }


def preprocessor_config(model: Blip2OPT) -> dict[str, Any]:
    """``BlipImageProcessor`` settings of the model's inputs (see ``blip2.processors``)."""
    return {
        "image_processor_type": "BlipImageProcessor", "processor_class": "Blip2Processor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": model.image_size, "width": model.image_size},
        "image_mean": list(model.image_mean), "image_std": list(model.image_std),
    }


def generation_config(model: Blip2OPT) -> dict[str, Any]:
    """``generation_config.json``: the model's token ids and default decoding settings."""
    ids = {"bos_token_id": model.bos_token_id, "eos_token_id": model.eos_token_id, "pad_token_id": model.pad_token_id}
    return {**ids, **model.generation_defaults}


def _write_json(obj: Mapping[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def save_pretrained(model: Blip2OPT, config: Mapping[str, Any], folder: str | os.PathLike) -> Path:
    """Write ``model`` (with its ``Blip2Config`` ``config``) as an HF folder; returns the folder."""
    if model.tokenizer is None:
        raise ValueError("save_pretrained: the model has no tokenizer to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v for k, v in model.state_dict().items() if k != TIED[0]}
    save_checkpoint(weights, folder / "model.safetensors", metadata={"format": "pt"})
    _write_json(hf_config(config), folder / "config.json")
    _write_json(preprocessor_config(model), folder / "preprocessor_config.json")
    _write_json(generation_config(model), folder / GENERATION_FILE)
    model.tokenizer.save_pretrained(str(folder))
    return folder


def export_checkpoint(ckpt: str | os.PathLike, folder: str | os.PathLike, tokenizer: str | os.PathLike,
                      image_size: int | None = None, base: str | os.PathLike | None = None) -> Path:
    """A ``Blip2OPTFinetune`` checkpoint -> an HF folder; ``tokenizer``: a folder with the tokenizer
    files; ``image_size``: the training resolution (default: the config's); ``base``: a lean
    checkpoint's base folder, when it was moved (``core.lean``)."""
    model, _ = load_blip2(ckpt, tokenizer=tokenizer, image_size=image_size, base=base)
    return save_pretrained(model, model.config, folder)


def run(argv: Sequence[str]) -> int:
    p = ArgumentParser(description="Blip2OPTFinetune checkpoint -> Hugging Face folder")
    p.add_argument("--ckpt", required=True, help="training checkpoint (last.ckpt)")
    p.add_argument("--tokenizer", required=True, help="folder with the tokenizer files (e.g. the base HF folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: the config's)")
    p.add_argument("--base_weights", metavar="DIR",
                   help="a lean checkpoint's base HF folder, when it was moved (its content is checked)")
    args = p.parse_args(argv)
    export_checkpoint(args.ckpt, args.out, args.tokenizer, args.image_size, args.base_weights)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``run``; bad input is one line on stderr and exit status 2 (``core.cli``)."""
    return run_cli("blip2.export", run, argv)


if __name__ == "__main__":
    sys.exit(main())
