"""A tiny random BLIP-2 OPT saved as a Hub HF folder, and its transformers twin, for parity tests.

``make_tiny_blip2_folder(path, layout)`` writes ``config.json``, ``model.safetensors`` (or shards),
``generation_config.json`` (eos "\\n", as the Hub's folders), a byte-level BPE tokenizer trained here on a few captions (GPT-2 files
plus ``tokenizer.json``; ids 0-3 are OPT's ``<s> <pad> </s> <unk>`` and "\\n" is one token) and a
``preprocessor_config.json``. ``layout="image_tokens"``: the current Hub layout with an
``<image>`` token; ``"prepend"``: the older one without it. Every parameter is random
(``randomize_``), so no zero-initialised layer hides a mistake.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests._util import randomize_

CAPTIONS = [
    "a photo of a cat sitting on a couch\n",
    "two dogs playing in the snow\n",
    "a man riding a bike down the street\n",
    "a bowl of fruit on a wooden table\n",
    "Question: what is the cat doing? Answer: sleeping\n",
    "Question: how many dogs are there? Answer: two\n",
]
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0, 1, 2, 3
IMAGE_SIZE, PATCH_SIZE, NUM_QUERIES = 28, 7, 4
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def save_tiny_tokenizer(path: Path, image_token: bool, vocab_size: int = 300):
    """Train a byte-level BPE on ``CAPTIONS`` and save it as an OPT-style (bos-adding) tokenizer."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import AutoTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CAPTIONS, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS)
    bpe.save_model(str(path))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "bos_token": "</s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 64,
    }))
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if image_token:
        tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    tokenizer.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tiny_blip2_config(vocab_size: int, image_token_index: int | None, image_size: int = IMAGE_SIZE):
    """A ``Blip2Config`` a few kilobytes big: 3 Q-Former layers (cross-attention at 0 and 2)."""
    from transformers import Blip2Config

    return Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=PATCH_SIZE),
        qformer_config=dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
                            max_position_embeddings=32, vocab_size=100),
        text_config=dict(model_type="opt", vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                         num_attention_heads=4, max_position_embeddings=96, word_embed_proj_dim=32),
        num_query_tokens=NUM_QUERIES, image_token_index=image_token_index,
    )


def make_tiny_blip2_folder(path, layout: str = "image_tokens", seed: int = 0, max_shard_size: str | None = None,
                           image_size: int = IMAGE_SIZE) -> Path:
    """Write a tiny random BLIP-2 OPT Hub folder at ``path``; ``max_shard_size`` (e.g. "20KB") shards it."""
    from transformers import Blip2ForConditionalGeneration

    if layout not in ("image_tokens", "prepend"):
        raise ValueError(f"layout must be 'image_tokens' or 'prepend', got {layout!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tiny_tokenizer(path, image_token=layout == "image_tokens")
    image_id = tokenizer.convert_tokens_to_ids("<image>") if layout == "image_tokens" else None
    config = tiny_blip2_config(len(tokenizer), image_id, image_size)
    config.text_config.eos_token_id = tokenizer("\n", add_special_tokens=False)["input_ids"][0]  # as on the Hub
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    randomize_(model, seed=seed)
    model.save_pretrained(str(path), **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BlipImageProcessor", "do_resize": True, "do_normalize": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_convert_rgb": True, "resample": 3,
        "size": {"height": image_size, "width": image_size}, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
    }))
    return path


def load_reference(path):
    """The transformers model saved in ``path`` (fp32, eval)."""
    from transformers import Blip2ForConditionalGeneration

    return Blip2ForConditionalGeneration.from_pretrained(str(path)).eval()


def reference_logits(ref, pixels, ids, mask):
    """transformers' logits over [queries; text] for either Hub layout."""
    visual = ref.get_image_features(pixels).pooler_output  # (B, Q, D)
    embeds = torch.cat([visual, ref.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([torch.ones(visual.shape[:2], dtype=mask.dtype), mask], dim=1)
    if ref.config.image_token_index is None:
        return ref.language_model(inputs_embeds=embeds, attention_mask=full_mask).logits, full_mask
    image_ids = torch.full(visual.shape[:2], ref.config.image_token_index)
    logits = ref(pixel_values=pixels, input_ids=torch.cat([image_ids, ids], dim=1), attention_mask=full_mask).logits
    return logits, full_mask


def one_torch_thread():
    """Generator for a module-scoped autouse fixture: tiny models run several times faster on one
    thread when the CPU is shared; the previous thread count comes back afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_pixels(batch: int = 2, seed: int = 0, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Normalised-looking random pixels [B, 3, S, S]."""
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
