"""BLIP-2 OPT generation: token ids identical to transformers' ``generate`` on a tiny random model."""
from collections import Counter

import pytest
import torch
from transformers import GenerationConfig

from blip2 import Blip2OPT
from blip2.generation import top_k
from blip2.modules.opt import KVCache
from tests.blip2_fixtures import load_reference, make_tiny_blip2_folder, one_torch_thread, tiny_pixels

PROMPTS = ["", "a photo of", "Question: what is the cat doing? Answer:"]  # mixed lengths: left padding
_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


class Pair:
    """Our model and transformers' on the same folder, with a prepared mixed-prompt batch."""

    def __init__(self, folder):
        self.ours, self.ref = Blip2OPT.from_pretrained(folder), load_reference(folder)
        self.pixels = tiny_pixels(len(PROMPTS), seed=7)
        self.ids, self.mask = self.ours.tokenize(PROMPTS, len(PROMPTS))
        greedy = self.ours.generate_ids(self.pixels, self.ids, self.mask, max_new_tokens=12)
        self.frequent = Counter(greedy[:, 1:].flatten().tolist()).most_common(1)[0][0]  # an eos that gets hit

    @torch.no_grad()
    def reference(self, **options):
        """transformers' new tokens: Blip2 ``generate`` with ``<image>`` ids, or (older layout) the
        language model's ``generate`` from the prepended embeddings, as LAVIS does."""
        options.setdefault("pad_token_id", self.ours.pad_token_id)
        options.setdefault("eos_token_id", self.ours.eos_token_id)
        queries = self.ours.query_tokens.shape[1]
        full_mask = torch.cat([torch.ones(len(PROMPTS), queries, dtype=torch.long), self.mask], dim=1)
        if self.ours.image_token_index is None:
            visual = self.ref.get_image_features(self.pixels).pooler_output
            embeds = torch.cat([visual, self.ref.get_input_embeddings()(self.ids)], dim=1)
            return self.ref.language_model.generate(inputs_embeds=embeds, attention_mask=full_mask, **options)
        image_ids = torch.full((len(PROMPTS), queries), self.ours.image_token_index)
        input_ids = torch.cat([image_ids, self.ids], dim=1)
        out = self.ref.generate(pixel_values=self.pixels, input_ids=input_ids, attention_mask=full_mask, **options)
        return out[:, input_ids.shape[1]:]

    def assert_same(self, seed=0, **options):
        torch.manual_seed(seed)
        ours = self.ours.generate_ids(self.pixels, self.ids, self.mask, **options)
        torch.manual_seed(seed)
        expected = self.reference(**options)
        assert ours.tolist() == expected.tolist(), options


@pytest.fixture(scope="module")
def image_tokens(tmp_path_factory):
    return Pair(make_tiny_blip2_folder(tmp_path_factory.mktemp("image_tokens"), "image_tokens", seed=2))


@pytest.fixture(scope="module")
def prepend(tmp_path_factory):
    return Pair(make_tiny_blip2_folder(tmp_path_factory.mktemp("prepend"), "prepend", seed=2))


CASES = [
    dict(max_new_tokens=8),
    dict(max_new_tokens=10, min_new_tokens=5, eos="frequent"),
    dict(max_new_tokens=9, repetition_penalty=1.5, no_repeat_ngram_size=2, eos="frequent"),
    dict(max_new_tokens=7, repetition_penalty=0.7, eos="frequent"),
    dict(num_beams=2, max_new_tokens=8, eos="frequent"),
    dict(num_beams=3, max_new_tokens=8, length_penalty=-1.0, eos="frequent"),
    dict(num_beams=4, max_new_tokens=10, length_penalty=2.0, eos="frequent"),
    dict(num_beams=3, max_new_tokens=10, early_stopping=True, eos="frequent"),
    dict(num_beams=2, max_new_tokens=10, early_stopping="never", length_penalty=2.0, eos="frequent"),
    dict(num_beams=5, max_new_tokens=8, length_penalty=0.0, num_return_sequences=3, eos="frequent"),
    dict(num_beams=4, max_new_tokens=8, repetition_penalty=1.3, num_return_sequences=4, eos="frequent"),
    dict(num_beams=3, max_new_tokens=9, no_repeat_ngram_size=2, num_return_sequences=2),
    dict(num_beams=5, max_new_tokens=12, min_new_tokens=8, eos="frequent"),
    dict(num_beams=3, max_new_tokens=6, min_new_tokens=3, length_penalty=-1.0, num_return_sequences=3),
    dict(do_sample=True, max_new_tokens=8, top_k=20, top_p=0.8, temperature=0.7, num_return_sequences=3,
         eos="frequent"),
    dict(do_sample=True, num_beams=3, max_new_tokens=8, num_return_sequences=2, eos="frequent"),
]


def _options(pair, case):
    options = dict(case)
    if options.pop("eos", None) == "frequent":
        options["eos_token_id"] = pair.frequent
    return options


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_ids_match_transformers_image_token_layout(image_tokens, case):
    image_tokens.assert_same(**_options(image_tokens, case))


@pytest.mark.filterwarnings("ignore:Passing .* with `inputs_embeds`")  # the LAVIS semantics we test
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5], CASES[7], CASES[10], CASES[14]],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_ids_match_transformers_prepend_layout(prepend, case):
    prepend.assert_same(**_options(prepend, case))


def test_eos_paths_are_exercised(image_tokens):
    ids = image_tokens.ours.generate_ids(image_tokens.pixels, image_tokens.ids, image_tokens.mask,
                                         num_beams=3, max_new_tokens=10, eos_token_id=image_tokens.frequent)
    assert (ids == image_tokens.frequent).any() and (ids == image_tokens.ours.pad_token_id).any()


@pytest.mark.parametrize("options", [dict(max_new_tokens=6), dict(num_beams=3, max_new_tokens=6, length_penalty=-1.0)])
def test_cache_off_gives_the_same_tokens(image_tokens, options):
    p = image_tokens
    cached = p.ours.generate_ids(p.pixels, p.ids, p.mask, eos_token_id=p.frequent, **options)
    uncached = p.ours.generate_ids(p.pixels, p.ids, p.mask, eos_token_id=p.frequent, use_cache=False, **options)
    assert cached.tolist() == uncached.tolist()


def test_generate_strings_without_the_prompt(image_tokens):
    p = image_tokens
    texts = p.ours.generate(p.pixels, PROMPTS, num_beams=2, max_new_tokens=6, num_return_sequences=2)
    expected_ids = p.reference(num_beams=2, max_new_tokens=6, num_return_sequences=2)
    tokenizer, newline = p.ours.tokenizer, p.ours.eos_token_id
    expected = []
    for row in expected_ids.tolist():
        row = row[: row.index(newline)] if newline in row else row
        expected.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    assert texts == expected and len(texts) == 2 * len(PROMPTS)


def test_no_prompt_equals_bos_only(image_tokens):
    p = image_tokens
    bos = torch.full((3, 1), p.ours.bos_token_id)
    assert p.ours.generate(p.pixels, max_new_tokens=5) == p.ours.decode_text(
        p.ours.generate_ids(p.pixels, bos, max_new_tokens=5), [p.ours.eos_token_id])


def test_answer_fills_the_template(image_tokens):
    p = image_tokens
    questions = ["what is the cat doing?", "how many dogs are there?", "what is this?"]
    answers = p.ours.answer(p.pixels, questions, num_beams=2, max_new_tokens=4)
    assert answers == p.ours.generate(p.pixels, [f"Question: {q} Answer:" for q in questions], num_beams=2,
                                      max_new_tokens=4)
    short = p.ours.answer(p.pixels, questions, template="Q: {} A:", max_new_tokens=4)
    assert short == p.ours.generate(p.pixels, [f"Q: {q} A:" for q in questions], max_new_tokens=4)


def test_generation_config_or_keywords(image_tokens):
    p = image_tokens
    config = GenerationConfig(num_beams=3, max_new_tokens=6, length_penalty=-1.0, eos_token_id=p.frequent)
    from_config = p.ours.generate_ids(p.pixels, p.ids, p.mask, generation_config=config)
    from_keywords = p.ours.generate_ids(p.pixels, p.ids, p.mask, num_beams=3, max_new_tokens=6, length_penalty=-1.0,
                                        eos_token_id=p.frequent)
    assert from_config.tolist() == from_keywords.tolist()
    overridden = p.ours.generate_ids(p.pixels, p.ids, p.mask, generation_config=config, max_new_tokens=3)
    assert overridden.shape[1] <= 3


@pytest.mark.parametrize("bad,message", [
    (dict(beam_size=3), "unknown generation option"),
    (dict(generation_config=GenerationConfig(max_length=20)), r"unsupported option\(s\) \['max_length'\]"),
    (dict(num_return_sequences=2), "needs beam search"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
])
def test_bad_generation_options_are_named(image_tokens, bad, message):
    p = image_tokens
    with pytest.raises(ValueError, match=message):
        p.ours.generate_ids(p.pixels, p.ids, p.mask, **bad)


@pytest.mark.parametrize("vocab", [50304, 50303, 60000, 300])
@pytest.mark.parametrize("k", [1, 10])
def test_top_k_equals_torch_topk(vocab, k):
    gen = torch.Generator().manual_seed(vocab + k)
    x = torch.randn(3, 4, vocab, generator=gen)
    x[0, 0, -1] = 100.0  # the best entry in the tail past the last whole block
    x[1, 2, :3] = torch.tensor([60.0, 61.0, 62.0])
    x[2, 1, ::2] = -float("inf")
    values, index = top_k(x, k)
    expected = torch.topk(x, k, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(index, expected.indices)


def test_top_k_with_ties_keeps_the_best_values():
    x = torch.randint(0, 4, (5, 50304), generator=torch.Generator().manual_seed(0)).float()
    values, index = top_k(x, 10)
    assert torch.equal(values, torch.topk(x, 10).values) and torch.equal(x.gather(1, index), values)
    assert all(len(set(row)) == 10 for row in index.tolist())


def _naive_cache(k, v, steps):
    """What a KV cache must hold: [rows, h, S, d] rebuilt from every step's rows by concatenation."""
    keys, values = k, v
    for kind, arg, new_k, new_v in steps:
        if kind == "expand":
            keys, values = keys.repeat_interleave(arg, 0), values.repeat_interleave(arg, 0)
        else:
            keys, values = keys[arg], values[arg]
        keys, values = torch.cat([keys, new_k], 2), torch.cat([values, new_v], 2)
    return keys, values


@pytest.mark.parametrize("prefix", [2, 9])  # short prefix: whole-copy reorders; long: in-place ones
def test_kv_cache_expand_and_beam_reorders(prefix):
    gen = torch.Generator().manual_seed(prefix)
    batch, beams, heads, dim, steps = 3, 4, 2, 5, 6
    cache = KVCache(depth=2, capacity=prefix + steps)
    k0, v0 = torch.randn(batch, heads, prefix, dim, generator=gen), torch.randn(batch, heads, prefix, dim, generator=gen)
    for layer in range(2):
        cache.update(layer, k0 + layer, v0 - layer)
    cache.length += prefix
    plan = []
    for step in range(steps):
        new_k = torch.randn(batch * beams, heads, 1, dim, generator=gen)
        new_v = torch.randn(batch * beams, heads, 1, dim, generator=gen)
        if step == 0:
            cache.expand(beams)
            plan.append(("expand", beams, new_k, new_v))
        else:  # each input's rows reordered among themselves, some repeated
            within = torch.randint(0, beams, (batch, beams), generator=gen)
            index = (within + torch.arange(batch)[:, None] * beams).flatten()
            cache.select(index)
            plan.append(("select", index, new_k, new_v))
        for layer in range(2):
            got_k, got_v = cache.update(layer, new_k + layer, new_v - layer)
        cache.length += 1
        for layer in range(2):
            want_k, want_v = _naive_cache(k0 + layer, v0 - layer, [(a, b, c + layer, d - layer) for a, b, c, d in plan])
            assert torch.equal(cache.keys[layer][:, :, :cache.length], want_k)
            assert torch.equal(cache.values[layer][:, :, :cache.length], want_v)


def test_kv_cache_a_reorder_across_inputs_moves_everything():
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(depth=1, capacity=12)
    k0, v0 = torch.randn(2, 1, 8, 3, generator=gen), torch.randn(2, 1, 8, 3, generator=gen)
    cache.update(0, k0, v0)
    cache.length += 8
    cache.expand(2)
    new_k, new_v = torch.randn(4, 1, 1, 3, generator=gen), torch.randn(4, 1, 1, 3, generator=gen)
    cache.update(0, new_k, new_v)
    cache.length += 1
    index = torch.tensor([2, 3, 0, 1])  # the inputs swapped: not a beam reorder
    cache.select(index)
    want_k, want_v = _naive_cache(k0, v0, [("expand", 2, new_k, new_v)])
    assert torch.equal(cache.keys[0][:, :, :9], want_k[index]) and torch.equal(cache.values[0][:, :, :9], want_v[index])
    assert cache.shared == 0
    KVCache(depth=1, capacity=4).expand(3)  # nothing cached yet: nothing to repeat


def test_min_new_tokens_masks_eos_like_transformers():
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    from blip2.generation import MinNewTokens

    scores = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    history = torch.zeros(3, 6, dtype=torch.long)
    for eos in ([3], [3, 12], [-1, 4], [12]):  # ids outside the vocabulary are ignored, as transformers does
        eos = torch.tensor(eos)
        for min_new in (1, 4):  # 6 ids = 4 prompt + 2 new: still masked, then not
            expected = MinNewTokensLengthLogitsProcessor(4, min_new, eos)(history, scores.clone())
            assert torch.equal(MinNewTokens(4, min_new, eos)(history, scores.clone()), expected)


def test_top_k_of_no_rows():
    values, index = top_k(torch.zeros(0, 50304), 10)
    assert values.shape == index.shape == (0, 10)


@pytest.mark.parametrize("case", [CASES[5], CASES[9], CASES[11], CASES[12]], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_ids_match_transformers_through_the_block_top_k(image_tokens, case, monkeypatch):
    """The tiny vocabulary is below ``top_k``'s threshold: with blocks of 4 the block path runs."""
    import blip2.generation as generation

    calls = []
    block_top_k = generation.top_k
    monkeypatch.setattr(generation, "top_k", lambda x, k: calls.append(k) or block_top_k(x, k, block=4))
    image_tokens.assert_same(**_options(image_tokens, case))
    vocab = image_tokens.ours.language_model.lm_head.weight.shape[0]
    assert calls and all(vocab >= 4 * k * 4 for k in calls)
