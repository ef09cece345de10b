"""The sd-v1 text conditioner: tokenizer ids vs open_clip / transformers, text model vs transformers."""
import importlib.util
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
from torch import nn
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTokenizer as HFCLIPTokenizer

from ldm.modules.encoders.clip_text import CLIPTextModel, pool_eos
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.modules.encoders.tokenizer import CLIPTokenizer, build_vocab, clean_text, read_merges
from tests._util import randomize_, rel_err

BOS, EOS = 49406, 49407
LONG_PROMPT = "a highly detailed photo of a sks dog, " * 12
PROMPTS = [
    "a photo of sks dog",
    "A PHOTO OF A SKS DOG, Trending On ArtStation!!!",
    "Hello, world... (masterpiece:1.2) [dog]; {cat} -- ok?!",
    "Café crème brûlée à la mode, naïve Ünïcödé ÆØÅ ß ﬁsh",
    "a cat 🐱 wearing sunglasses 😎 👨‍👩‍👧",
    "一只猫在月球上 東京の夜景 서울",
    "3.14159 and 42 cats in 2024, 1,000,000 $100 50%",
    "salt &amp; pepper &lt;3 &quot;quoted&quot; &#39;hi&#39; &amp;amp;",
    "  a   photo\tof\n\n a  dog   ",
    "it's the dog's bowl, isn't it? we'll see, I'd say they've I'm",
    "doesnâ€™t look right",
    "",
    LONG_PROMPT,
]


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    """open_clip's SimpleTokenizer, loaded alone (``import open_clip`` needs torchvision)."""
    folder = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", Path(folder) / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


def test_tokenizer_matches_open_clip(tokenizer, open_clip_tokenizer):
    with pytest.warns(UserWarning, match="prompt truncated"):
        ours = tokenizer(PROMPTS)
    ref = open_clip_tokenizer(PROMPTS)  # padded with 0
    assert ours.shape == (len(PROMPTS), 77) and ours.dtype == torch.long
    for row, prompt in enumerate(PROMPTS):
        n = min(len(open_clip_tokenizer.encode(prompt)) + 2, 77)
        assert ours[row, :n].tolist() == ref[row, :n].tolist(), prompt
        assert (ours[row, n:] == EOS).all(), prompt


def test_truncation_keeps_bos_and_ends_with_eos(tokenizer, open_clip_tokenizer):
    n_tokens = len(tokenizer.encode(LONG_PROMPT))
    assert n_tokens > 75
    with pytest.warns(UserWarning, match=f"{n_tokens} tokens, CLIP keeps 75, dropped the last {n_tokens - 75}"):
        ids = tokenizer([LONG_PROMPT, "a dog"])
    assert ids[0, 0] == BOS and ids[0, -1] == EOS and (ids[0, 1:-1] != EOS).all()
    assert ids[0].tolist() == open_clip_tokenizer([LONG_PROMPT])[0].tolist()


def test_tokenizer_matches_transformers(tokenizer):
    merges = read_merges()
    vocab = build_vocab(merges)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    hf = HFCLIPTokenizer(vocab=vocab, merges=merges)
    cleaned = [clean_text(p) for p in PROMPTS]  # transformers' fast tokenizer has no ftfy/html step
    ref = hf(cleaned, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with pytest.warns(UserWarning):
        assert torch.equal(tokenizer(PROMPTS), ref)


def test_bad_prompt_type_is_one_clear_error(tokenizer):
    with pytest.raises(ValueError, match="item 1 is int"):
        tokenizer(["a dog", 3])


def _tiny_config() -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5)


def test_tiny_text_model_matches_transformers_through_diffusers_converter(tokenizer):
    ours = randomize_(CLIPTextModel(width=32, layers=2, heads=2)).eval()
    saved = {"cond_stage_model.transformer." + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_clip_checkpoint(saved)
    hf = HFCLIPTextModel(_tiny_config()).eval()
    # transformers 5 dropped the text_model wrapper; diffusers strips the prefix the same way
    hf.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()}, strict=True)
    with pytest.warns(UserWarning):
        ids = tokenizer(PROMPTS)
    with torch.no_grad():
        hidden = ours(ids)
        ref = hf(input_ids=ids)
    assert hidden.shape == (len(PROMPTS), 77, 32)
    assert rel_err(hidden, ref.last_hidden_state) <= 1e-5
    assert rel_err(pool_eos(hidden, ids), ref.pooler_output) <= 1e-5


def _vit_l14_config() -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5)


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_full_size_layout_equals_transformers_and_loads_with_or_without_position_ids():
    with torch.device("meta"):
        hf_state = {"text_model." + k: v for k, v in HFCLIPTextModel(_vit_l14_config()).state_dict().items()}
        parent = nn.Module()
        parent.cond_stage_model = FrozenCLIPEmbedder()
    ours = {k.removeprefix("cond_stage_model.transformer."): v for k, v in parent.state_dict().items()}
    assert _shapes(ours) == _shapes(hf_state)
    sd_v1 = {"cond_stage_model.transformer." + k: v for k, v in hf_state.items()}
    parent.load_state_dict(sd_v1, strict=True)
    position_ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    parent.load_state_dict({**sd_v1, position_ids: torch.arange(77)[None]}, strict=True)
    parent.load_state_dict({**sd_v1, position_ids: torch.arange(77.0)[None]}, strict=True)
    with pytest.raises(ValueError, match="embeddings.position_ids: expected arange"):
        parent.load_state_dict({**sd_v1, position_ids: torch.arange(77).flip(0)[None]}, strict=True)


def test_frozen_clip_embedder_shape_freeze_and_truncation():
    embedder = FrozenCLIPEmbedder(width=32, layers=2, heads=2)
    prompts = ["a photo of sks dog", "a dog"]
    out = embedder(prompts)
    assert out.shape == (2, 77, 32) and not out.requires_grad
    assert not embedder.training and not any(p.requires_grad for p in embedder.parameters())
    assert torch.equal(embedder.encode(prompts), out)
    assert torch.equal(embedder.tokenize(prompts), CLIPTokenizer()(prompts))
    assert all(k.startswith("transformer.text_model.") for k in embedder.state_dict())
    with pytest.warns(UserWarning, match="prompt truncated"):
        assert embedder([LONG_PROMPT]).shape == (1, 77, 32)


def test_unfrozen_embedder_trains():
    embedder = FrozenCLIPEmbedder(width=32, layers=2, heads=2, freeze=False)
    embedder(["a photo of sks dog"]).square().mean().backward()
    grads = [p.grad for p in embedder.parameters()]
    assert embedder.training and all(g is not None for g in grads)


def test_unsupported_version_is_rejected():
    with pytest.raises(ValueError, match="clip-vit-base-patch32"):
        FrozenCLIPEmbedder(version="openai/clip-vit-base-patch32", width=32, layers=2, heads=2)


def test_gradient_checkpointing_gives_the_same_gradients():
    """``use_checkpoint``: each encoder layer is recomputed in the backward pass, gradients unchanged."""
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        enc = FrozenCLIPEmbedder(width=32, layers=2, heads=2, freeze=False, use_checkpoint=use_checkpoint)
        calls, layer = [], enc.transformer.text_model.encoder.layers[0]
        forward = layer.forward
        layer.forward = lambda x, forward=forward: calls.append(1) or forward(x)  # (checkpointing skips hooks)
        enc(["a photo of sks dog", "a dog"]).square().sum().backward()
        grads.append([p.grad.clone() for p in enc.parameters()])
        assert len(calls) == (2 if use_checkpoint else 1)  # recomputed once in the backward pass
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))
