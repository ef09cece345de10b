"""BLIP-2 OPT configuration, in the field names of transformers' ``Blip2Config``.

A config is a plain dict with ``vision_config``, ``qformer_config``, ``text_config``,
``num_query_tokens`` and ``image_token_index`` (``None``: the older Hub layout that prepends the
query embeddings; an id: the layout with ``num_query_tokens`` ``<image>`` tokens in the text).
Missing fields take transformers' defaults, so a Hub ``config.json`` and a ``Blip2Config`` object
read the same. The ``*_args`` functions turn it into our modules' constructor arguments.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import torch.nn.functional as F

VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
    image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
)
QFORMER_DEFAULTS: dict[str, Any] = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, layer_norm_eps=1e-12,
    pad_token_id=0, cross_attention_frequency=2, use_qformer_text_input=False,
    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
)
OPT_DEFAULTS: dict[str, Any] = dict(
    model_type="opt", vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
    num_attention_heads=12, max_position_embeddings=2048, do_layer_norm_before=True,
    _remove_final_layer_norm=False, word_embed_proj_dim=None, activation_function="relu",
    pad_token_id=1, bos_token_id=2, eos_token_id=2, enable_bias=True,
    layer_norm_elementwise_affine=True, tie_word_embeddings=True, dropout=0.1, attention_dropout=0.0,
)
ACTIVATIONS: dict[str, Callable] = {"gelu": F.gelu, "relu": F.relu}


class ConfigError(ValueError):
    """A BLIP-2 config that this implementation cannot build; the message names the field."""


def activation(name: str) -> Callable:
    """The activation function named in a config (``gelu`` is the exact erf form)."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"activation {name!r} is not supported, expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _filled(part: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    return {**defaults, **dict(part or {})}


def _square(size: Any, name: str) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    raise ConfigError(f"vision_config.{name}: expected one int (square images), got {size!r}")


def _check_text(text: Mapping[str, Any]) -> None:
    if text["model_type"] != "opt":
        raise ConfigError(f"text_config.model_type: only 'opt' is supported, got {text['model_type']!r}")
    if not text["do_layer_norm_before"] or text["_remove_final_layer_norm"]:
        raise ConfigError("text_config: only pre-LN OPT with a final layer norm is supported (not OPT-350m)")
    if text["word_embed_proj_dim"] not in (None, text["hidden_size"]):
        raise ConfigError("text_config.word_embed_proj_dim must equal hidden_size (project_in/out is OPT-350m only)")


SIZE_FIELDS = ("hidden_size", "intermediate_size", "ffn_dim", "num_hidden_layers", "num_attention_heads",
               "image_size", "patch_size", "vocab_size")
SECTIONS = {"vision_config": VISION_DEFAULTS, "qformer_config": QFORMER_DEFAULTS, "text_config": OPT_DEFAULTS}


def defaulted_sizes(raw: Mapping[str, Any]) -> list[str]:
    """The size fields a raw config leaves to transformers' defaults, as ``section.field=default``."""
    return [f"{section}.{field}={defaults[field]}" for section, defaults in SECTIONS.items()
            for field in SIZE_FIELDS if field in defaults and field not in (raw.get(section) or {})]


def normalize_config(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A ``Blip2Config`` object or dict -> a dict of the same fields with every default filled."""
    raw = config.to_dict() if hasattr(config, "to_dict") else copy.deepcopy(dict(config))
    out = {
        "vision_config": _filled(raw.get("vision_config"), VISION_DEFAULTS),
        "qformer_config": _filled(raw.get("qformer_config"), QFORMER_DEFAULTS),
        "text_config": _filled(raw.get("text_config"), OPT_DEFAULTS),
        "num_query_tokens": int(raw.get("num_query_tokens", 32)),
        "image_token_index": raw.get("image_token_index", raw.get("image_token_id")),
    }
    out["qformer_config"]["encoder_hidden_size"] = out["vision_config"]["hidden_size"]
    _check_text(out["text_config"])
    return out


def vision_args(config: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of ``EvaViT`` from a normalised config."""
    v = config["vision_config"]
    return dict(
        image_size=_square(v["image_size"], "image_size"), patch_size=_square(v["patch_size"], "patch_size"),
        width=v["hidden_size"], depth=v["num_hidden_layers"], heads=v["num_attention_heads"],
        mlp_dim=v["intermediate_size"], eps=v["layer_norm_eps"], act=v["hidden_act"], qkv_bias=v["qkv_bias"],
    )


def qformer_args(config: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of ``QFormer`` from a normalised config."""
    q = config["qformer_config"]
    return dict(
        dim=q["hidden_size"], depth=q["num_hidden_layers"], heads=q["num_attention_heads"],
        ffn_dim=q["intermediate_size"], encoder_dim=q["encoder_hidden_size"], eps=q["layer_norm_eps"],
        act=q["hidden_act"], cross_attention_frequency=q["cross_attention_frequency"],
        text_ffn=q["use_qformer_text_input"], hidden_dropout=q["hidden_dropout_prob"],
        attention_dropout=q["attention_probs_dropout_prob"],
    )


def opt_args(config: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of ``OPTForCausalLM`` from a normalised config."""
    t = config["text_config"]
    return dict(
        vocab_size=t["vocab_size"], dim=t["hidden_size"], depth=t["num_hidden_layers"],
        heads=t["num_attention_heads"], ffn_dim=t["ffn_dim"], max_positions=t["max_position_embeddings"],
        act=t["activation_function"], bias=t["enable_bias"], norm_affine=t["layer_norm_elementwise_affine"],
        pad_token_id=t["pad_token_id"], dropout=t["dropout"], attention_dropout=t["attention_dropout"],
    )


OPT_SIZES: dict[str, dict[str, int]] = {  # facebook/opt-* config.json (vocabulary without <image>: 50272)
    "2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240),
    "6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384),
}
OPT_VOCAB, IMAGE_TOKEN_VOCAB, IMAGE_TOKEN_ID = 50272, 50304, 50265  # the Hub revision with <image> tokens


def blip2_opt(size: str = "2.7b", image_size: int = 224, image_tokens: bool = True) -> dict[str, Any]:
    """The ``Salesforce/blip2-opt-{size}`` config (``image_size=364``: the ``-coco`` model).

    EVA ViT-g/14 (1408 wide, 39 blocks, 16 heads, MLP 6144), a BERT-base Q-Former with 32 queries
    and cross-attention every 2nd layer, OPT of ``OPT_SIZES[size]``. ``image_tokens``: the current
    Hub revision (32 ``<image>`` tokens, id 50265, vocab 50304); else the older one and LAVIS's
    (queries prepended, vocab 50272).
    """
    if size not in OPT_SIZES:
        raise ConfigError(f"OPT size {size!r}: expected one of {sorted(OPT_SIZES)}")
    return normalize_config({
        "vision_config": dict(image_size=image_size),
        "qformer_config": {},
        "text_config": dict(vocab_size=IMAGE_TOKEN_VOCAB if image_tokens else OPT_VOCAB,
                            word_embed_proj_dim=OPT_SIZES[size]["hidden_size"], **OPT_SIZES[size]),
        "num_query_tokens": 32,
        "image_token_index": IMAGE_TOKEN_ID if image_tokens else None,
    })


def blip2_opt_2_7b(image_size: int = 224, image_tokens: bool = True) -> dict[str, Any]:
    """``blip2_opt("2.7b", ...)``: OPT-2.7b (2560 wide, 32 layers, 32 heads, FFN 10240)."""
    return blip2_opt("2.7b", image_size, image_tokens)


def blip2_opt_6_7b(image_size: int = 224, image_tokens: bool = True) -> dict[str, Any]:
    """``blip2_opt("6.7b", ...)``: OPT-6.7b (4096 wide, 32 layers, 32 heads, FFN 16384)."""
    return blip2_opt("6.7b", image_size, image_tokens)
