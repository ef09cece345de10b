"""BLIP-2 OPT networks and loading, against transformers' ``Blip2ForConditionalGeneration``."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip2 import Blip2OPT
from blip2.config import blip2_opt, qformer_args
from blip2.modules.qformer import QFormer
from core.weights import CheckpointError
from tests._util import randomize_, rel_err
from tests.blip2_fixtures import (load_reference, make_tiny_blip2_folder, one_torch_thread, reference_logits,
                                  tiny_blip2_config, tiny_pixels)

PROMPTS = ["a photo of", "Question: how many dogs are there? Answer:"]
_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module", params=["image_tokens", "prepend"])
def pair(request, tmp_path_factory):
    folder = make_tiny_blip2_folder(tmp_path_factory.mktemp(request.param), request.param, seed=1)
    return folder, Blip2OPT.from_pretrained(folder), load_reference(folder)


def test_weights_equal_reference(pair):
    folder, ours, ref = pair
    ref_state = ref.state_dict()
    assert set(ours.state_dict()) == set(ref_state)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    assert ours.language_model.lm_head.weight is ours.language_model.model.decoder.embed_tokens.weight
    assert (ours.image_size, ours.image_mean[0], ours.image_std[2]) == (28, 0.48145466, 0.27577711)


@torch.no_grad()
def test_logits_match_captioning_and_vqa(pair):
    _, ours, ref = pair
    pixels = tiny_pixels(2)
    ids, mask = ours.tokenize(PROMPTS, 2)  # left padded: the caption prompt is shorter
    assert mask[0, 0] == 0 and ids[0, -1] != ours.tokenizer.pad_token_id
    expected, full_mask = reference_logits(ref, pixels, ids, mask)
    logits = ours(pixels, ids, mask)
    assert logits.shape == expected.shape
    valid = full_mask.bool()
    assert rel_err(logits[valid], expected[valid]) <= 1e-5


@torch.no_grad()
def test_no_prompt_logits_match(pair):
    _, ours, ref = pair
    pixels = tiny_pixels(3, seed=4)
    ids = torch.full((3, 1), ours.bos_token_id)
    expected, _ = reference_logits(ref, pixels, ids, torch.ones_like(ids))
    assert rel_err(ours(pixels, ids), expected) <= 1e-5


@torch.no_grad()
def test_positions_interpolated_for_other_image_sizes(pair):
    _, ours, ref = pair
    pixels = tiny_pixels(2, image_size=42)  # a 6 x 6 grid for a 4 x 4 table, as the -coco model at 364 px
    expected = ref.vision_model(pixels, interpolate_pos_encoding=True).last_hidden_state
    assert rel_err(ours.vision_model(pixels), expected) <= 1e-5


@torch.no_grad()
def test_half_precision_keeps_qformer_fp32(pair):
    folder, ours, _ = pair
    half = Blip2OPT.from_pretrained(folder, dtype=torch.bfloat16)
    assert half.query_tokens.dtype == torch.float32
    assert {p.dtype for p in half.qformer.parameters()} == {torch.float32}
    for part in (half.vision_model, half.language_projection, half.language_model):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
    pixels = tiny_pixels(2)
    ids, mask = ours.tokenize(PROMPTS, 2)
    logits = half(pixels, ids, mask)
    assert logits.dtype == torch.bfloat16
    valid = torch.cat([torch.ones(2, half.query_tokens.shape[1], dtype=torch.long), mask], dim=1).bool()
    assert rel_err(logits[valid].float(), ours(pixels, ids, mask)[valid]) < 0.05


def test_sharded_folder_loads(tmp_path):
    folder = make_tiny_blip2_folder(tmp_path, "image_tokens", seed=1, max_shard_size="40KB")
    shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    ours, ref = Blip2OPT.from_pretrained(folder), load_reference(folder)
    ref_state = ref.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in ours.state_dict().items())


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_key_mismatches_give_one_line_errors(tmp_path):
    folder = make_tiny_blip2_folder(tmp_path, "prepend", seed=1)
    _rewrite(folder, lambda t: t.pop("qformer.encoder.layer.2.crossattention.attention.key.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys 1 \(qformer\.encoder\.layer\.2\.crossattention") as err:
        Blip2OPT.from_pretrained(folder)
    assert str(folder / "model.safetensors") in str(err.value) and "\n" not in str(err.value)
    _rewrite(folder, lambda t: t.update({
        "qformer.encoder.layer.2.crossattention.attention.key.bias": torch.zeros(24),
        "qformer.embeddings.position_ids": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys 1 \(qformer\.embeddings\.position_ids\)"):
        Blip2OPT.from_pretrained(folder)
    _rewrite(folder, lambda t: (t.pop("qformer.embeddings.position_ids"),
                                t.update({"language_projection.bias": torch.zeros(5)})))
    with pytest.raises(CheckpointError, match=r"wrong shapes 1 \(language_projection\.bias \(5,\) \(expected \(32,\)\)\)"):
        Blip2OPT.from_pretrained(folder)


def test_tied_head_may_be_stored(tmp_path):
    folder = make_tiny_blip2_folder(tmp_path, "image_tokens", seed=1)
    embed = "language_model.model.decoder.embed_tokens.weight"
    _rewrite(folder, lambda t: t.update({"language_model.lm_head.weight": t[embed].clone()}))
    head_too = Blip2OPT.from_pretrained(folder)
    _rewrite(folder, lambda t: t.pop(embed))
    head_only = Blip2OPT.from_pretrained(folder)
    assert torch.equal(head_only.language_model.lm_head.weight, head_too.language_model.lm_head.weight)
    assert head_only.language_model.lm_head.weight is head_only.language_model.model.decoder.embed_tokens.weight
    _rewrite(folder, lambda t: t.update({embed: t["language_model.lm_head.weight"] + 1}))
    with pytest.raises(CheckpointError, match="differs from"):
        Blip2OPT.from_pretrained(folder)


@pytest.mark.parametrize("size,width,ffn", [("2.7b", 2560, 10240), ("6.7b", 4096, 16384)])
@pytest.mark.parametrize("image_size,image_tokens", [(224, True), (364, True), (224, False)])
def test_full_size_keys_and_shapes_match_transformers(size, width, ffn, image_size, image_tokens):
    """Salesforce/blip2-opt-{2.7b,6.7b}(-coco), built from their config on the meta device."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = blip2_opt(size, image_size, image_tokens)
    with torch.device("meta"):
        ref = Blip2ForConditionalGeneration(Blip2Config(**config))
    ours = Blip2OPT.from_config(config, device="meta")
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert shapes["vision_model.embeddings.position_embedding"] == (1, (image_size // 14) ** 2 + 1, 1408)
    assert shapes["language_model.lm_head.weight"] == (50304 if image_tokens else 50272, width)
    assert shapes["language_model.model.decoder.layers.31.fc1.weight"] == (ffn, width)
    assert "language_model.model.decoder.layers.32.fc1.weight" not in shapes
    assert shapes["language_projection.weight"] == (width, 768)
    assert ours.eos_token_id == 50118 and ours.image_token_index == (50265 if image_tokens else None)


def test_bin_folders_load_single_and_sharded(tmp_path):
    """transformers' older folders: ``pytorch_model.bin``, or shards with ``pytorch_model.bin.index.json``."""
    folder = make_tiny_blip2_folder(tmp_path / "single", "image_tokens", seed=1)
    reference = Blip2OPT.from_pretrained(folder).state_dict()
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    assert all(torch.equal(v, reference[k]) for k, v in Blip2OPT.from_pretrained(folder).state_dict().items())
    (folder / "pytorch_model.bin").unlink()
    keys, weight_map = sorted(tensors), {}
    for i, name in enumerate(["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]):
        torch.save({k: tensors[k] for k in keys[i::2]}, folder / name)
        weight_map.update(dict.fromkeys(keys[i::2], name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert all(torch.equal(v, reference[k]) for k, v in Blip2OPT.from_pretrained(folder).state_dict().items())
    torch.save({"x": torch.zeros(1), "code": print}, folder / name)  # a pickle that carries code
    with pytest.raises(CheckpointError, match=f"{name}: refused to load"):
        Blip2OPT.from_pretrained(folder)
    (folder / "pytorch_model.bin.index.json").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        Blip2OPT.from_pretrained(folder)


def test_generation_config_with_an_unsupported_option_is_one_line(tmp_path):
    folder = make_tiny_blip2_folder(tmp_path, "prepend", seed=1)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "max_length": 20}))
    with pytest.raises(CheckpointError) as err:
        Blip2OPT.from_pretrained(folder)
    assert str(err.value).startswith(f"{folder / 'generation_config.json'}: unsupported option(s) ['max_length']")
    (folder / "generation_config.json").write_text(json.dumps({"num_beams": 2, "num_return_sequences": 3}))
    with pytest.raises(CheckpointError, match=r"generation_config.json: num_return_sequences \(3\) > num_beams"):
        Blip2OPT.from_pretrained(folder)


def test_from_config_takes_a_transformers_config():
    from transformers import Blip2ForConditionalGeneration

    config = tiny_blip2_config(vocab_size=301, image_token_index=300, image_size=42)
    ours, ref = Blip2OPT.from_config(config), Blip2ForConditionalGeneration(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.image_size == 42 and ours.generate_ids(tiny_pixels(1, image_size=42), max_new_tokens=2).shape[0] == 1


@torch.no_grad()
def test_qformer_text_path_matches_transformers():
    from transformers import Blip2QFormerModel

    config = tiny_blip2_config(vocab_size=300, image_token_index=None)
    config.qformer_config.use_qformer_text_input = True
    ref = randomize_(Blip2QFormerModel(config.qformer_config).eval(), seed=3)
    ours = QFormer(**qformer_args({"qformer_config": config.qformer_config.to_dict()})).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    queries, text, image = torch.randn(2, 4, 24), torch.randn(2, 5, 24), torch.randn(2, 17, 32)
    expected = ref(query_embeds=torch.cat([queries, text], dim=1), query_length=4,
                   encoder_hidden_states=image).last_hidden_state
    assert rel_err(ours(queries, image, text), expected) <= 1e-5
