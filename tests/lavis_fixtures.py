"""LAVIS-layout files made from a tiny Hugging Face BLIP-2 folder by running the rules of
transformers' LAVIS converter (``convert_blip_2_original_to_pytorch.py``) backwards, so that the
folder is exactly what the converter would make of them.

The converter's rules, forwards (LAVIS -> HF), as read from it:
- ``visual_encoder.cls_token`` / ``pos_embed`` / ``patch_embed.proj.*`` -> ``vision_model.embeddings.
  class_embedding`` / ``position_embedding`` / ``patch_embedding.*``; ``ln_vision.*`` ->
  ``vision_model.post_layernorm.*``;
- ``visual_encoder.blocks.i.{norm1, norm2, attn.qkv.weight, attn.proj, mlp.fc1, mlp.fc2}`` ->
  ``vision_model.encoder.layers.i.{layer_norm1, layer_norm2, self_attn.qkv.weight,
  self_attn.projection, mlp.fc1, mlp.fc2}``; ``attn.q_bias``, ``attn.v_bias`` -> ``self_attn.qkv.bias``
  = cat(q_bias, zeros, v_bias);
- ``Qformer.bert.embeddings.LayerNorm.*`` -> ``qformer.layernorm.*``; then ``Qformer.bert`` -> ``qformer``,
  "self" -> "attention" in keys with ``attention.self``, ``opt_proj`` -> ``language_projection``,
  ``opt`` (``opt_model``) -> ``language`` (``language_model``);
- ITM models also: ``Qformer.bert.embeddings.word_embeddings`` / ``position_embeddings`` ->
  ``embeddings.*``, ``vision_proj`` / ``text_proj`` -> ``vision_projection`` / ``text_projection``;
- the converter expects ``qformer.embeddings.position_ids`` left over (a buffer of LAVIS's) and,
  for ITM, ``temp`` and ``Qformer.cls.*``.

Files written: the LAVIS ``{"model": ...}`` file (the trained parts, as LAVIS saves them), the
EVA ViT file (flat EVA keys, with one extra block as EVA ViT-g has one block more than BLIP-2 uses)
and an OPT folder in the ``facebook/opt-*`` layout (``config.json``, ``decoder.*`` weights in
``pytorch_model.bin``, the tokenizer files).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

VISION_EMBEDDINGS = {"class_embedding": "cls_token", "position_embedding": "pos_embed",
                     "patch_embedding.weight": "patch_embed.proj.weight", "patch_embedding.bias": "patch_embed.proj.bias"}
VISION_LAYER = {"layer_norm1.": "norm1.", "layer_norm2.": "norm2.", "self_attn.qkv.weight": "attn.qkv.weight",
                "self_attn.projection.": "attn.proj.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def zero_k_bias(folder: Path) -> None:
    """EVA has no k bias: set the k third of every fused qkv bias of the folder's ViT to 0, as in the
    converter's output."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    for key, value in tensors.items():
        if key.endswith("self_attn.qkv.bias"):
            width = value.shape[0] // 3
            value[width:2 * width] = 0
    save_file(tensors, str(path), metadata={"format": "pt"})


def eva_state(hf: dict[str, torch.Tensor], extra_block: bool = True) -> dict[str, torch.Tensor]:
    """The EVA keys (no prefix) of the HF ``vision_model.*`` tensors, without ``post_layernorm``."""
    out = {}
    for key, value in hf.items():
        if not key.startswith("vision_model.") or "post_layernorm" in key:
            continue
        rest = key[len("vision_model."):]
        if rest.startswith("embeddings."):
            out[VISION_EMBEDDINGS[rest[len("embeddings."):]]] = value
            continue
        layer, tail = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", rest).groups()
        if tail == "self_attn.qkv.bias":
            width = value.shape[0] // 3
            assert not value[width:2 * width].any(), "the converter's k bias is zero"
            out[f"blocks.{layer}.attn.q_bias"], out[f"blocks.{layer}.attn.v_bias"] = value[:width], value[2 * width:]
            continue
        prefix = next(h for h in VISION_LAYER if tail.startswith(h))
        out[f"blocks.{layer}.{VISION_LAYER[prefix]}{tail[len(prefix):]}"] = value
    if extra_block:  # EVA ViT-g's 40th block, which BLIP-2 drops
        depth = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks."))
        out.update({k.replace("blocks.0.", f"blocks.{depth}.", 1): torch.randn_like(v)
                    for k, v in out.items() if k.startswith("blocks.0.")})
    return out


def qformer_key(ours: str) -> str:
    """LAVIS's key of an HF ``qformer.*`` key (the converter backwards)."""
    if ours.startswith("qformer.layernorm."):
        return "Qformer.bert.embeddings.LayerNorm." + ours.rsplit(".", 1)[1]
    key = "Qformer.bert." + ours[len("qformer."):]
    return re.sub(r"\.(attention|crossattention)\.attention\.", r".\1.self.", key)


def lavis_state(hf: dict[str, torch.Tensor], with_vit: bool) -> dict[str, torch.Tensor]:
    """The LAVIS stage-2 / caption state dict of the HF tensors (the OPT goes to its folder)."""
    out = {"Qformer.bert.embeddings.position_ids": torch.arange(32)[None]}  # the buffer LAVIS saves
    for key, value in hf.items():
        if key.startswith("qformer."):
            out[qformer_key(key)] = value
        elif key.startswith("language_projection."):
            out["opt_proj." + key.split(".", 1)[1]] = value
        elif key == "query_tokens":
            out[key] = value
        elif key.startswith("vision_model.post_layernorm."):
            out["ln_vision." + key.rsplit(".", 1)[1]] = value
    if with_vit:
        out.update({"visual_encoder." + k: v for k, v in eva_state(hf, extra_block=False).items()})
    return out


def write_opt_folder(hf_folder: Path, hf: dict[str, torch.Tensor], out: Path, prefix: str = "decoder.",
                     shards: int = 1) -> Path:
    """The OPT of the HF folder as ``facebook/opt-*`` saves it: ``config.json``, ``decoder.*`` keys
    (``prefix``) in ``pytorch_model.bin`` (or ``shards`` files with their index), the tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    text_config = json.loads((hf_folder / "config.json").read_text())["text_config"]
    (out / "config.json").write_text(json.dumps({**text_config, "architectures": ["OPTForCausalLM"]}))
    state = {prefix + k[len("language_model.model.decoder."):]: v.clone() for k, v in hf.items()
             if k.startswith("language_model.model.decoder.")}
    if shards == 1:
        torch.save(state, out / "pytorch_model.bin")
    else:
        keys, weight_map = sorted(state), {}
        for i in range(shards):
            name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            part = keys[i::shards]
            torch.save({k: state[k] for k in part}, out / name)
            weight_map.update(dict.fromkeys(part, name))
        (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in TOKENIZER_FILES:
        if (hf_folder / name).is_file():
            shutil.copy(hf_folder / name, out / name)
    return out


def write_lavis_files(hf_folder: Path, out: Path, with_vit: bool = False) -> tuple[Path, Path | None, Path]:
    """(LAVIS file, EVA ViT file or None when ``with_vit`` puts the ViT in the LAVIS file, OPT folder)."""
    out.mkdir(parents=True, exist_ok=True)
    hf = load_file(str(hf_folder / "model.safetensors"))
    name = "blip2_caption_opt.pth" if with_vit else "blip2_pretrained_opt.pth"
    torch.save({"model": lavis_state(hf, with_vit)}, out / name)
    vit = None
    if not with_vit:
        vit = out / "eva_vit_g.pth"
        torch.save(eva_state(hf), vit)
    return out / name, vit, write_opt_folder(hf_folder, hf, out / "opt")


def lavis_stage1_state(hf: dict[str, torch.Tensor], lm_head: dict[str, torch.Tensor],
                       temp: torch.Tensor) -> dict[str, torch.Tensor]:
    """LAVIS's ``blip2_pretrained.pth`` state of an HF ``Blip2ForImageTextRetrieval`` folder plus the
    ITG head (our ``lm_head.*``) and ``temp`` that such folders lack."""
    out = {"Qformer.bert.embeddings.position_ids": torch.arange(32)[None], "temp": temp}
    renamed = {"vision_projection.": "vision_proj.", "text_projection.": "text_proj.", "itm_head.": "itm_head.",
               "embeddings.": "Qformer.bert.embeddings."}
    for key, value in hf.items():
        if key.startswith("qformer."):
            out[qformer_key(key)] = value
        elif key == "query_tokens":
            out[key] = value
        elif key.startswith("vision_model.post_layernorm."):
            out["ln_vision." + key.rsplit(".", 1)[1]] = value
        elif not key.startswith("vision_model."):
            prefix = next(p for p in renamed if key.startswith(p))
            out[renamed[prefix] + key[len(prefix):]] = value
    head = "Qformer.cls.predictions."
    out.update({head + "transform." + k[len("lm_head."):]: v for k, v in lm_head.items() if k != "lm_head.bias"})
    out[head + "bias"] = out[head + "decoder.bias"] = lm_head["lm_head.bias"]
    out[head + "decoder.weight"] = hf["embeddings.word_embeddings.weight"]
    return out
