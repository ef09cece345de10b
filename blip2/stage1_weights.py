"""Weights for the BLIP-2 stage-1 network (``blip2.modules.blip2_qformer.Blip2Qformer``), read from
safetensors one tensor at a time, every key and shape checked.

- ``load_retrieval_folder``: a Hub ``Blip2ForImageTextRetrieval`` folder (``Salesforce/blip2-itm-vit-g``
  layout), all of its keys; ``temp`` and the ITG head are not in such folders.
- ``load_vision_weights``: the ``vision_model.*`` tensors of any BLIP-2 Hub folder (the frozen EVA
  ViT-g and ``ln_vision``), e.g. ``Salesforce/blip2-opt-2.7b``, to start stage 1 from.
- ``load_bert_weights``: a ``bert-base-uncased`` folder (``BertForMaskedLM`` keys) into the Q-Former,
  as BLIP-2 initialises it (paper Sec. 3.1; LAVIS ``init_Qformer``): embeddings (BERT's token-type
  embeddings are dropped), self-attention, the text FFN copied into the query FFN, the LM head; the
  cross-attention layers and the extra ``[DEC]`` row keep their random initialisation.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from blip2.hub import image_settings, load_tokenizer
from core.weights import CheckpointError, check_keys, open_folder, read_json, wrong_shape

STAGE1_ONLY = ("temp", "lm_head.")  # parameters that Hub retrieval folders do not hold
ROW_PREFIX_KEYS = ("embeddings.word_embeddings.weight", "lm_head.bias")  # BERT's 30522 rows of our 30523
BERT_KEY = re.compile(r"bert\.encoder\.layer\.(\d+)\.(.+)")
BERT_LAYER = {  # a BERT layer's tensors -> our Q-Former layer's (FFN tensors go to both FFNs)
    "attention.self.": ["attention.attention."], "attention.output.": ["attention.output."],
    "intermediate.": ["intermediate.", "intermediate_query."], "output.": ["output.", "output_query."],
}
BERT_OTHER = {
    "bert.embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "bert.embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
    "bert.embeddings.LayerNorm.weight": "qformer.layernorm.weight",
    "bert.embeddings.LayerNorm.bias": "qformer.layernorm.bias",
    "cls.predictions.transform.dense.weight": "lm_head.dense.weight",
    "cls.predictions.transform.dense.bias": "lm_head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "lm_head.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias": "lm_head.LayerNorm.bias", "cls.predictions.bias": "lm_head.bias",
}
BERT_UNUSED = ("bert.embeddings.token_type_embeddings.", "bert.pooler.", "cls.seq_relationship.",
               "cls.predictions.decoder.", "bert.embeddings.position_ids")


@torch.no_grad()
def copy_into(model: nn.Module, source: str, readers: dict[str, Callable[[], torch.Tensor]]) -> None:
    """``model``'s tensor ``key`` <- ``readers[key]()``, one at a time, shapes checked; a tensor with
    fewer rows fills the first rows (BERT's vocabulary inside ours with ``[DEC]``)."""
    targets = model.state_dict()
    for key, read in readers.items():
        tensor, target = read(), targets[key]
        rows_fit = tensor.shape[1:] == target.shape[1:] and tensor.shape[0] <= target.shape[0]
        if tensor.shape != target.shape and not (key in ROW_PREFIX_KEYS and rows_fit):
            check_keys(source, type(model).__name__, readers, readers, wrong=[wrong_shape(key, tensor.shape, target.shape)])
        target[:tensor.shape[0]].copy_(tensor)


def load_retrieval_folder(cls: type, folder: Path, device: str | torch.device, **kwargs: Any) -> Any:
    """``Blip2Qformer.from_pretrained``: build on the meta device, allocate on ``device``, initialise
    (``temp`` and ``lm_head`` keep these values), then copy the folder's tensors."""
    source, readers = open_folder(folder)
    config = read_json(folder / "config.json")
    with torch.device("meta"):
        model = cls(config.get("vision_config"), config.get("qformer_config"), config.get("num_query_tokens", 32),
                    config.get("image_text_hidden_size", 256), tokenizer=load_tokenizer(folder), **kwargs)
    model = model.to_empty(device=device)
    model.init_weights()
    expected = {k for k in model.state_dict() if not k.startswith(STAGE1_ONLY)}
    check_keys(source, "Blip2ForImageTextRetrieval", set(readers), expected)
    copy_into(model, source, readers)
    for name, value in image_settings(folder, model.image_size).items():
        setattr(model, name, value)
    return model.eval()


def load_vision_weights(model: nn.Module, folder: Path) -> None:
    """The ``vision_model.*`` tensors of a BLIP-2 Hub folder (all of them, nothing else is read)."""
    source, readers = open_folder(folder)
    found = {k: r for k, r in readers.items() if k.startswith("vision_model.")}
    expected = {k for k in model.state_dict() if k.startswith("vision_model.")}
    check_keys(source, "BLIP-2 vision_model", set(found), expected)
    copy_into(model, source, found)


def bert_targets(key: str) -> list[str]:
    """Our keys for one ``BertForMaskedLM`` key ([] for the tensors BLIP-2 does not use)."""
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if key.startswith(BERT_UNUSED):
        return []
    if key in BERT_OTHER:
        return [BERT_OTHER[key]]
    match = BERT_KEY.fullmatch(key)
    if match:
        layer, rest = match.groups()
        for prefix, ours in BERT_LAYER.items():
            if rest.startswith(prefix):
                return [f"qformer.encoder.layer.{layer}.{o}{rest[len(prefix):]}" for o in ours]
    raise CheckpointError(f"unexpected key {key!r}: not a BertForMaskedLM (bert-base-uncased) tensor")


def load_bert_weights(model: nn.Module, folder: Path) -> None:
    """Initialise the Q-Former from ``bert-base-uncased`` (see the module notes)."""
    source, readers = open_folder(folder)
    try:
        mapped = {target: reader for key, reader in readers.items() for target in bert_targets(key)}
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    expected = {k for k in model.state_dict() if k.startswith("qformer.") and "crossattention" not in k}
    expected |= {v for v in BERT_OTHER.values()}
    check_keys(source, "bert-base-uncased (BertForMaskedLM)", set(mapped), expected)
    copy_into(model, source, mapped)
