"""BLIP-2 checkpoints of salesforce/LAVIS read into our networks, every key mapped by the rules of
transformers' converter (``convert_blip_2_original_to_pytorch.py``), nothing ignored silently.

The files (each read with ``torch.load(weights_only=True)``, memory-mapped):

- the LAVIS file, ``{"model": state_dict}``: ``blip2_pretrained_opt2.7b.pth`` / ``opt6.7b`` (stage 2:
  ``query_tokens``, ``ln_vision``, the Q-Former ``Qformer.bert.*`` without its text path,
  ``opt_proj``), ``blip2_caption_opt2.7b.pth`` / ``opt6.7b`` (also the fine-tuned ViT
  ``visual_encoder.*``, 364 px), ``blip2_pretrained.pth`` (stage 1, into ``Blip2Qformer``: the
  whole Q-Former with its text path and LM head ``Qformer.cls``, ``vision_proj``, ``text_proj``,
  ``itm_head``, ``temp``);
- the EVA ViT-g file ``eva_vit_g.pth`` (EVA's keys, no prefix), for a LAVIS file without the ViT;
- an OPT folder in the ``facebook/opt-2.7b`` layout (``config.json``, weights, tokenizer): the
  language model and its tokenizer, as LAVIS loads them (``opt_model``, ``opt_tokenizer``).

Each of our keys comes from exactly one file. The rules (LAVIS -> ours, i.e. transformers'
``Blip2ForConditionalGeneration`` / ``Blip2ForImageTextRetrieval`` keys; ``blip2.stage1_weights``
holds the BERT part, shared with the ``bert-base-uncased`` start of stage 1):

1. ViT (``visual_encoder.`` in the LAVIS file, no prefix in the ViT file), ``EVA_KEYS``: cls_token,
   pos_embed, patch_embed.proj -> ``vision_model.embeddings.*``; blocks.i.{norm1, norm2, attn.qkv,
   attn.proj, mlp.fc1, mlp.fc2} -> ``vision_model.encoder.layers.i.{layer_norm1, layer_norm2,
   self_attn.qkv, self_attn.projection, mlp.fc1, mlp.fc2}``; attn.q_bias and attn.v_bias ->
   ``self_attn.qkv.bias`` = [q_bias, 0, v_bias]. ``ln_vision`` -> ``vision_model.post_layernorm``.
2. ``Qformer.bert.encoder.layer.i.*`` -> ``qformer.encoder.layer.i.*`` with ``attention.self`` /
   ``crossattention.self`` -> ``.attention``; ``Qformer.bert.embeddings`` and ``Qformer.cls``:
   ``stage1_weights.BERT_OTHER`` (LayerNorm -> ``qformer.layernorm``, word / position embeddings ->
   ``embeddings.*``, the LM-head transform and bias -> ``lm_head.*``).
3. ``query_tokens``, ``itm_head``, ``temp`` as they are; ``opt_proj`` -> ``language_projection``;
   ``vision_proj`` / ``text_proj`` -> ``vision_projection`` / ``text_projection``.
4. The OPT folder: ``decoder.*`` (or ``model.decoder.*``) -> ``language_model.model.decoder.*``;
   ``lm_head.weight``, tied to the token embedding, may be absent.

``DROPPED`` lists the keys that have no counterpart, each with its reason; any other key that
does not fit is one ``core.weights`` error line naming the file and the key.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from blip2.config import VISION_DEFAULTS, normalize_config, opt_args
from blip2.hub import LAYOUT, TIED, assign_weights, load_tokenizer
from blip2.modules.blip2_opt import Blip2OPT, newline_token_id
from blip2.modules.blip2_qformer import Blip2Qformer
from blip2.stage1_weights import BERT_OTHER
from core.weights import (CheckpointError, load_checkpoint, open_folder, raise_mismatch, read_json, weights_of,
                          wrong_shape)

VIT_PREFIX = "visual_encoder."
EVA_EMBEDDINGS = {"cls_token": "class_embedding", "pos_embed": "position_embedding",
                  "patch_embed.proj.weight": "patch_embedding.weight", "patch_embed.proj.bias": "patch_embedding.bias"}
EVA_BLOCK = {"norm1.": "layer_norm1.", "norm2.": "layer_norm2.", "attn.qkv.weight": "self_attn.qkv.weight",
             "attn.proj.": "self_attn.projection.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
QV_BIAS = {"attn.q_bias": 0, "attn.v_bias": 2}  # their thirds of the fused [q, k, v] bias (k is 0)
BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
QFORMER_LAYER = re.compile(r"Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)")
RENAMED = {"query_tokens": "query_tokens", "ln_vision.weight": "vision_model.post_layernorm.weight",
           "ln_vision.bias": "vision_model.post_layernorm.bias", "temp": "temp"}
RENAMED_PREFIX = {"opt_proj.": "language_projection.", "vision_proj.": "vision_projection.",
                  "text_proj.": "text_projection.", "itm_head.": "itm_head."}
TEXT_FFN = re.compile(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")  # not *_query
# The LM head's decoder: tied copies of the word embeddings and of the head's bias (our ITG head
# uses those two directly), checked equal to their twins, then dropped.
TIED_HEAD = {"Qformer.cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
             "Qformer.cls.predictions.decoder.bias": "lm_head.bias"}

# Keys with no counterpart in our network, and why (LAVIS keys, or our names for a network).
DROPPED_LAVIS = {
    "Qformer.bert.embeddings.position_ids": "BERT's position-id buffer (arange), recomputed",
}
DROPPED_EVA = {  # EVA ViT-g keys (block ``depth`` is the one after the last we build)
    "blocks.{depth}.": "EVA's last block: BLIP-2 takes the features of the second-to-last (paper Sec. 3.1)",
    "norm.": "EVA's final norm, after the features BLIP-2 takes (ln_vision is BLIP-2's own)",
    "fc_norm.": "EVA's pooled-feature norm, after the features BLIP-2 takes",
    "head.": "EVA's classifier / projection head, unused by BLIP-2",
}
DROPPED_IN_OPT = {  # stage-1 parts a Blip2OPT has no place for (LAVIS's Blip2OPT sets them to None)
    "embeddings.": "the Q-Former's text embeddings: BLIP-2 OPT gives the Q-Former no text",
    "lm_head.": "the Q-Former's ITG head (stage 1 only)",
    "vision_projection.": "the ITC image projection (stage 1 only)",
    "text_projection.": "the ITC text projection (stage 1 only)",
    "itm_head.": "the ITM head (stage 1 only)",
    "temp": "the ITC temperature (stage 1 only)",
    "text FFN": "the Q-Former's text FFN (intermediate / output): BLIP-2 OPT gives it no text",
}
REFUSED = {"t5_proj.": "a BLIP-2 FlanT5 file (t5_proj): only OPT language models are supported",
           "t5_model.": "a BLIP-2 FlanT5 file (t5_model): only OPT language models are supported"}


# ---- key rules ---------------------------------------------------------------------------------
def eva_key(key: str, depth: int) -> str | None:
    """Our key for an EVA ViT key (no ``visual_encoder.`` prefix); None when dropped by design;
    q/v biases map to the fused bias (see ``vision_weights``)."""
    if key in EVA_EMBEDDINGS:
        return f"vision_model.embeddings.{EVA_EMBEDDINGS[key]}"
    if key.startswith(tuple(p.format(depth=depth) for p in DROPPED_EVA)):
        return None
    match = BLOCK_KEY.fullmatch(key)
    if match:
        layer, rest = match.groups()
        if rest in QV_BIAS:
            return f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"
        for theirs, ours in EVA_BLOCK.items():
            if rest.startswith(theirs):
                return f"vision_model.encoder.layers.{layer}.{ours}{rest[len(theirs):]}"
    raise KeyError(key)


def lavis_key(key: str) -> str | None:
    """Our key for a LAVIS key other than the ViT's (None: dropped by design, ``DROPPED_LAVIS``)."""
    if key in DROPPED_LAVIS:
        return None
    if key in TIED_HEAD:  # kept under its own name: checked against its twin, then dropped
        return key
    if key.startswith(tuple(REFUSED)):
        raise CheckpointError(next(why for prefix, why in REFUSED.items() if key.startswith(prefix)))
    if key in RENAMED:
        return RENAMED[key]
    for theirs, ours in RENAMED_PREFIX.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    match = QFORMER_LAYER.fullmatch(key)
    if match:
        layer, rest = match.groups()
        rest = re.sub(r"^(attention|crossattention)\.self\.", r"\1.attention.", rest)
        return f"qformer.encoder.layer.{layer}.{rest}"
    if key.startswith("Qformer.") and key[len("Qformer."):] in BERT_OTHER:
        return BERT_OTHER[key[len("Qformer."):]]
    raise KeyError(key)


# ---- the files -------------------------------------------------------------------------------------
class Part:
    """One file's tensors under our keys: ``tensors`` {our key: tensor}, ``names`` {our key: its key
    in the file} (for errors), ``source`` the file."""

    def __init__(self, source: str):
        self.source, self.tensors, self.names = source, {}, {}

    def add(self, ours: str, theirs: str, tensor: torch.Tensor) -> None:
        self.tensors[ours], self.names[ours] = tensor, theirs


def read_lavis(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``model`` state dict of a LAVIS checkpoint."""
    obj = load_checkpoint(path, mmap=True)
    if "model" not in obj:
        raise CheckpointError(f"{path}: not a LAVIS checkpoint (no 'model' entry; found {sorted(obj)[:5]})")
    return weights_of(obj["model"], str(path))


def vision_weights(part: Part, state: Mapping[str, torch.Tensor], prefix: str, depth: int) -> list[str]:
    """Add the EVA ViT tensors of ``state`` (keys ``prefix`` + EVA key) to ``part``; returns the
    keys that are not EVA's. The fused qkv bias is built from q_bias and v_bias, k's third 0."""
    halves: dict[str, dict[int, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        try:
            ours = eva_key(key[len(prefix):], depth)
        except KeyError:
            unknown.append(key)
            continue
        if ours is not None and ours.endswith("qkv.bias"):
            third = QV_BIAS[BLOCK_KEY.fullmatch(key[len(prefix):]).group(2)]
            halves.setdefault(ours, {})[third] = tensor
        elif ours is not None:
            part.add(ours, key, tensor)
    for ours, pieces in halves.items():
        layer = ours.split(".")[3]
        name = f"{prefix}blocks.{layer}.attn.q_bias/v_bias"
        if len(pieces) != 2:
            lost = "attn.v_bias" if 0 in pieces else "attn.q_bias"
            raise CheckpointError(f"{part.source}: missing key {prefix}blocks.{layer}.{lost} (EVA stores q and v biases)")
        part.add(ours, name, torch.cat([pieces[0], torch.zeros_like(pieces[0]), pieces[2]]))
    return unknown


def lavis_part(path: str | os.PathLike, depth: int) -> Part:
    """The LAVIS file under our keys (its ViT too, when it holds one); unknown keys raise."""
    state = read_lavis(path)
    part = Part(str(path))
    vit = {k: v for k, v in state.items() if k.startswith(VIT_PREFIX)}
    unknown = vision_weights(part, vit, VIT_PREFIX, depth)
    for key, tensor in state.items():
        if key.startswith(VIT_PREFIX):
            continue
        try:
            ours = lavis_key(key)
        except KeyError:
            unknown.append(key)
            continue
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
        if ours is not None:
            part.add(ours, key, tensor)
    raise_mismatch(str(path), "LAVIS BLIP-2", [], unknown)
    return part


def vit_part(path: str | os.PathLike, depth: int) -> Part:
    """The EVA ViT file (e.g. ``eva_vit_g.pth``: flat EVA keys) under our keys."""
    obj = load_checkpoint(path, mmap=True)
    state = weights_of(obj.get("model", obj), str(path))
    part = Part(str(path))
    unknown = vision_weights(part, state, "", depth)
    raise_mismatch(str(path), "EVA ViT", [], unknown)
    return part


def opt_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """(``config.json`` of the OPT folder, its tokenizer)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: OPT folder not found")
    config = read_json(folder / "config.json")
    if config.get("model_type") != "opt":
        raise CheckpointError(f"{folder / 'config.json'}: model_type {config.get('model_type')!r}, expected 'opt'")
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise CheckpointError(f"{folder}: no tokenizer files (tokenizer.json / vocab.json) in the OPT folder")
    return config, tokenizer


def opt_part(folder: str | os.PathLike) -> tuple[Part, dict[str, Callable[[], torch.Tensor]]]:
    """The OPT folder's weights under our keys: (a part naming the keys, {our key: reader})."""
    source, readers = open_folder(folder)
    part, mapped, unknown = Part(source), {}, []
    for key, read in readers.items():
        rest = key.removeprefix("model.")
        if not (rest.startswith("decoder.") or key == "lm_head.weight"):
            unknown.append(key)
            continue
        ours = "language_model." + ("lm_head.weight" if key == "lm_head.weight" else f"model.{rest}")
        part.names[ours], mapped[ours] = key, read
    raise_mismatch(source, "OPTForCausalLM", [], unknown)
    return part, mapped


# ---- checks ------------------------------------------------------------------------------------------
def check_opt_width(lavis: Part, opt_config: Mapping[str, Any], opt: str | os.PathLike) -> None:
    """The OPT folder must be the one the queries are projected into (``opt_proj``'s output width)."""
    proj = lavis.tensors.get("language_projection.weight")
    width = opt_config.get("hidden_size")
    if proj is not None and proj.shape[0] != width:
        raise CheckpointError(
            f"{Path(opt) / 'config.json'}: an OPT of width {width}, but {lavis.source} projects the queries to "
            f"{proj.shape[0]} (opt_proj.weight {tuple(proj.shape)}): give the OPT folder that file was trained with")


def check_text_config(model: Blip2OPT, opt_config: Mapping[str, Any], opt: str | os.PathLike) -> None:
    """A model built from a config must have the OPT folder's architecture."""
    ours, theirs = opt_args(model.config), opt_args(normalize_config({"text_config": opt_config}))
    differ = [f"{k} {theirs[k]} (the model's: {ours[k]})" for k in ("dim", "depth", "heads", "ffn_dim", "vocab_size")
              if ours[k] != theirs[k]]
    if differ:
        raise CheckpointError(f"{Path(opt) / 'config.json'}: another OPT than the model's: {', '.join(differ)}")


def check_part(part: Part, targets: Mapping[str, torch.Tensor], layout: str, dropped: Callable[[str], bool]) -> None:
    """The part's keys belong to ``targets`` (or are ``dropped`` by design); its tensors have their shapes."""
    unexpected = [part.names[k] for k in part.names if k not in targets and not dropped(k)]
    wrong = [wrong_shape(part.names[k], v.shape, targets[k].shape) for k, v in part.tensors.items()
             if k in targets and v.shape != targets[k].shape]
    raise_mismatch(part.source, layout, [], unexpected, wrong)


def dropped_in(network: type[nn.Module]) -> Callable[[str], bool]:
    """Our keys that the LAVIS file may hold but ``network`` has no place for (see ``DROPPED_IN_OPT``)."""
    if network is Blip2Qformer:
        return lambda key: key in TIED_HEAD
    prefixes = tuple(p for p in DROPPED_IN_OPT if p.endswith("."))
    return lambda key: key in TIED_HEAD or key == "temp" or key.startswith(prefixes) or bool(TEXT_FFN.match(key))


def check_complete(parts: list[Part], targets: Mapping[str, Any], layout: str) -> None:
    """Every key of the model from exactly one file."""
    seen: dict[str, str] = {}
    for part in parts:
        for key in part.names:
            if key in seen and key in targets:
                raise CheckpointError(f"{part.source}: {part.names[key]} is also given by {seen[key]}: "
                                      "each weight may come from one file only")
            seen[key] = part.source
    head, embed = TIED
    missing = [k for k in targets if k not in seen and not (k == head and embed in seen)]
    if missing:
        sources = " + ".join(p.source for p in parts)
        raise_mismatch(sources, layout, missing, [])


# ---- loading -------------------------------------------------------------------------------------------
def vit_image_size(part: Part) -> int:
    """The image size a ViT's position table is for: (grid * patch) px."""
    positions = part.tensors["vision_model.embeddings.position_embedding"].shape[1] - 1
    patch = part.tensors["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    grid = int(round(positions ** 0.5))
    if grid * grid != positions:
        raise CheckpointError(f"{part.source}: pos_embed holds {positions} patch positions, not a square grid")
    return grid * patch


def _vision_parts(lavis: Part, vit: str | os.PathLike | None, depth: int) -> list[Part]:
    """The LAVIS file, and the ViT file when the LAVIS file holds no ViT (it must then be given)."""
    has_vit = "vision_model.embeddings.class_embedding" in lavis.tensors
    if vit is None and not has_vit:
        raise CheckpointError(f"{lavis.source}: holds no ViT (visual_encoder.*): give the EVA ViT-g file "
                              "(eva_vit_g.pth, --vit)")
    if vit is not None and has_vit:
        raise CheckpointError(f"{lavis.source}: holds its own (fine-tuned) ViT, visual_encoder.*: leave out "
                              f"the ViT file {vit}")
    return [lavis] if vit is None else [lavis, vit_part(vit, depth)]


def _vit_depth(model: nn.Module | None, vision_config: Mapping[str, Any] | None = None) -> int:
    """The number of ViT blocks the network has (BLIP-2's 39 unless ``model`` / ``vision_config`` say)."""
    if model is not None:
        return len(model.vision_model.encoder.layers)
    return {**VISION_DEFAULTS, **dict(vision_config or {})}["num_hidden_layers"]


def load_lavis_opt(lavis: str | os.PathLike, vit: str | os.PathLike | None, opt: str | os.PathLike,
                   model: Blip2OPT | None = None, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> Blip2OPT:
    """A ``Blip2OPT`` from a stage-2 or caption LAVIS file, the ViT file (when the LAVIS file has no
    ViT) and the OPT folder. ``model``: one built on the meta device to load into (e.g. from a
    config); by default BLIP-2's architecture (EVA ViT-g, BERT-base Q-Former) at the image size of
    the ViT's position table, with the queries of the file and the OPT of the folder's
    ``config.json`` (the older layout: queries prepended, no ``<image>`` token, as in LAVIS)."""
    part = lavis_part(lavis, _vit_depth(model))
    opt_config, tokenizer = opt_folder(opt)
    check_opt_width(part, opt_config, opt)
    parts = _vision_parts(part, vit, _vit_depth(model))
    if model is None:
        queries = part.tensors["query_tokens"].shape[1] if "query_tokens" in part.tensors else 32
        config = {"vision_config": {"image_size": vit_image_size(parts[-1])}, "text_config": opt_config,
                  "num_query_tokens": queries, "image_token_index": None}
        model = Blip2OPT.from_config(config, dtype=dtype, device="meta", tokenizer=tokenizer)
    else:
        check_text_config(model, opt_config, opt)
        model.tokenizer, model.eos_token_id = tokenizer, newline_token_id(tokenizer)
    targets = model.state_dict()
    for p in parts:
        check_part(p, targets, "BLIP-2 OPT (LAVIS)", dropped_in(Blip2OPT))
    language, readers = opt_part(opt)
    check_part(language, targets, "OPTForCausalLM", lambda key: False)
    check_complete([*parts, language], targets, LAYOUT)
    tensors = {k: v for p in parts for k, v in p.tensors.items() if k in targets}
    # the LAVIS and ViT shapes are checked: a shape that does not fit now is the OPT folder's
    return assign_weights(model.set_precision(dtype), language.source, set(tensors) | set(readers),
                          lambda k: readers[k]() if k in readers else tensors[k], device)


def _untie(part: Part) -> None:
    """LAVIS's LM head stores its decoder tied to the word embeddings and to its bias: check, drop."""
    for copy, twin in TIED_HEAD.items():
        if copy in part.tensors and twin in part.tensors and not torch.equal(part.tensors[copy], part.tensors[twin]):
            raise CheckpointError(f"{part.source}: {copy} differs from its tied twin {part.names[twin]}")


def _stage1_sizes(t: Mapping[str, torch.Tensor], vit: Part) -> dict[str, Any]:
    """``Blip2Qformer`` arguments read off the tensors: image size, queries, vocabulary, ITC width."""
    sizes: dict[str, Any] = {"vision_config": {"image_size": vit_image_size(vit)}}
    if "query_tokens" in t:
        sizes["num_query_tokens"] = t["query_tokens"].shape[1]
    if "vision_projection.weight" in t:
        sizes["embed_dim"] = t["vision_projection.weight"].shape[0]
    if "embeddings.word_embeddings.weight" in t:
        sizes["qformer_config"] = {"vocab_size": t["embeddings.word_embeddings.weight"].shape[0]}
    return sizes


def load_lavis_stage1(lavis: str | os.PathLike, vit: str | os.PathLike | None, model: Blip2Qformer | None = None,
                      device: str | torch.device = "cpu", **kwargs: Any) -> Blip2Qformer:
    """A ``Blip2Qformer`` from the stage-1 LAVIS file (``blip2_pretrained.pth``) and the ViT file.
    ``model``: one built on the meta device; by default BLIP-2's stage-1 network (EVA ViT-g,
    BERT-base Q-Former) with the file's image size, queries, vocabulary and ITC width, and
    ``kwargs``: constructor arguments over those (``tokenizer``, ``max_txt_len``, ``vision_config``...)."""
    depth = _vit_depth(model, kwargs.get("vision_config"))
    part = lavis_part(lavis, depth)
    _untie(part)
    parts = _vision_parts(part, vit, depth)
    if model is None:
        with torch.device("meta"):
            model = Blip2Qformer(**{**_stage1_sizes(part.tensors, parts[-1]), **kwargs})
    targets = model.state_dict()
    for p in parts:
        check_part(p, targets, "BLIP-2 stage 1 (LAVIS)", dropped_in(Blip2Qformer))
    check_complete(parts, targets, "Blip2Qformer")
    weights = {k: v.to(targets[k].dtype) for p in parts for k, v in p.tensors.items() if k in targets}
    model = model.to_empty(device=device)
    model.load_state_dict(weights, strict=True)
    return model.eval()
