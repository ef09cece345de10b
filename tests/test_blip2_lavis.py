"""LAVIS checkpoints (``blip2.lavis``): LAVIS-layout files made by running transformers' converter
rules backwards (``tests.lavis_fixtures``) load into the weights and logits of the HF folder the
converter makes of them; bad files are one line naming the file and the key."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from blip2 import Blip2OPT
from blip2.modules.blip2_qformer import Blip2Qformer
from core.weights import CheckpointError
from tests._util import randomize_, rel_err
from tests.blip2_fixtures import (load_reference, make_tiny_blip2_folder, one_torch_thread, reference_logits,
                                  tiny_pixels)
from tests.lavis_fixtures import eva_state, lavis_stage1_state, write_lavis_files, write_opt_folder, zero_k_bias

PROMPTS = ["a photo of", "Question: how many dogs are there? Answer:"]
_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def tiny(folder) -> dict:
    """``config=`` for a tiny network: a config whose ``model`` builds the folder's architecture (by
    default the files go into BLIP-2's full-size one)."""
    params = {"config": json.loads((folder / "config.json").read_text())}
    return {"model": {"target": "blip2.loading.build_blip2_opt", "params": params}}


def converted_folder(path, image_size=28):
    """The HF folder the converter makes: the older layout (queries prepended), EVA's k bias 0."""
    folder = make_tiny_blip2_folder(path, "prepend", seed=4, image_size=image_size)
    zero_k_bias(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lavis")
    folder = converted_folder(root / "hf")
    lavis, vit, opt = write_lavis_files(folder, root / "lavis")
    return dict(root=root, folder=folder, lavis=lavis, vit=vit, opt=opt, ref=load_reference(folder),
                ours=Blip2OPT.from_pretrained(lavis, vit=vit, opt=opt, config=tiny(folder)))


def assert_same_weights(ours, ref_state):
    state = ours.state_dict()
    assert set(state) == set(ref_state)
    for key, value in state.items():
        assert torch.equal(value, ref_state[key]), key


@torch.no_grad()
def test_lavis_files_give_the_converted_folders_weights_and_logits(world):
    ours, ref = world["ours"], world["ref"]
    assert_same_weights(ours, ref.state_dict())
    pixels = tiny_pixels(2)
    ids, mask = ours.tokenize(PROMPTS, 2)
    expected, full_mask = reference_logits(ref, pixels, ids, mask)
    valid = full_mask.bool()
    assert rel_err(ours(pixels, ids, mask)[valid], expected[valid]) <= 1e-5
    from_folder = Blip2OPT.from_pretrained(world["folder"])
    assert ours.generate(pixels, prompt="a photo of", max_new_tokens=5) == \
        from_folder.generate(pixels, prompt="a photo of", max_new_tokens=5)
    assert ours.image_token_index is None and ours.image_size == 28 and ours.eos_token_id == from_folder.eos_token_id


def test_a_caption_file_brings_its_own_vit_and_image_size(world, tmp_path):
    folder = converted_folder(tmp_path / "hf42", image_size=42)
    lavis, vit, opt = write_lavis_files(folder, tmp_path / "lavis", with_vit=True)
    assert vit is None
    ours = Blip2OPT.from_pretrained(lavis, opt=opt, config=tiny(folder))
    assert_same_weights(ours, load_reference(folder).state_dict())
    assert ours.image_size == 42
    with pytest.raises(CheckpointError, match=f"holds its own .*leave out the ViT file {world['vit']}"):
        Blip2OPT.from_pretrained(lavis, vit=world["vit"], opt=opt, config=tiny(folder))


def test_sharded_bin_opt_folder_with_model_prefix(world, tmp_path):
    hf = load_file(str(world["folder"] / "model.safetensors"))
    opt = write_opt_folder(world["folder"], hf, tmp_path / "opt", prefix="model.decoder.", shards=3)
    ours = Blip2OPT.from_pretrained(world["lavis"], vit=world["vit"], opt=opt, config=tiny(world["folder"]))
    assert_same_weights(ours, world["ref"].state_dict())


def stage1_files(tmp_path):
    """(a random HF retrieval folder as LAVIS's weights convert to, its LAVIS stage-1 file and EVA ViT
    file, the ITG head and temperature the folder lacks)."""
    from tests.test_blip2_stage1 import make_retrieval_folder, randomize_all_, write_bert_vocab

    folder = make_retrieval_folder(tmp_path / "itm", write_bert_vocab(tmp_path / "bert"))
    zero_k_bias(folder)
    hf = load_file(str(folder / "model.safetensors"))
    lm_head = {f"lm_head.{k}": v for k, v in randomize_all_(Blip2Qformer.from_pretrained(folder).lm_head, 2)
               .state_dict().items()}
    torch.save({"model": lavis_stage1_state(hf, lm_head, torch.tensor(0.05))}, tmp_path / "blip2_pretrained.pth")
    torch.save(eva_state(hf), tmp_path / "eva_vit_g.pth")
    return folder, tmp_path / "blip2_pretrained.pth", tmp_path / "eva_vit_g.pth", hf, lm_head


@torch.no_grad()
def test_stage1_file_into_blip2_qformer(tmp_path):
    from transformers import Blip2ForImageTextRetrieval

    from tests.test_blip2_stage1 import MAX_TXT, QUERIES, TEXTS, VISION, qformer_config

    folder, _, _, hf, lm_head = stage1_files(tmp_path)
    ours = Blip2Qformer.from_pretrained(tmp_path / "blip2_pretrained.pth", vit=tmp_path / "eva_vit_g.pth",
                                        tokenizer=str(folder), max_txt_len=MAX_TXT, vision_config=VISION,
                                        qformer_config=qformer_config(hf["embeddings.word_embeddings.weight"]
                                                                      .shape[0]), num_query_tokens=QUERIES)
    state = ours.state_dict()
    assert set(state) == set(hf) | set(lm_head) | {"temp"}
    assert all(torch.equal(state[k], v) for k, v in {**hf, **lm_head}.items()) and state["temp"] == 0.05
    ref = Blip2ForImageTextRetrieval.from_pretrained(str(folder)).eval()
    pixels = torch.randn(len(TEXTS), 3, 28, 28, generator=torch.Generator().manual_seed(1))
    ids, mask = ours.tokenize(TEXTS)
    expected = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    assert rel_err(ours.itm_logits_from_embeds(ours.image_embeds(pixels), ids, mask),
                   expected.logits_per_image) <= 1e-5


def test_retrieve_ranks_with_the_lavis_files_as_with_the_converted_folder(tmp_path, capsys):
    """``scripts/retrieve.py --lavis FILE --vit FILE``: the same ITC and ITM scores, to the printed digit,
    as ``--model`` on the folder transformers' converter rules make of those files."""
    from omegaconf import OmegaConf

    from scripts.retrieve import main as retrieve
    from tests.test_blip2_stage1 import EMBED, MAX_TXT, QUERIES, TEXTS, VISION, qformer_config, write_images

    folder, lavis, vit, hf, _ = stage1_files(tmp_path)
    write_images(tmp_path / "imgs", 3)
    OmegaConf.save({"model": {"target": "blip2.modules.blip2_qformer.Blip2Qformer", "params": {
        "vision_config": VISION, "qformer_config": qformer_config(hf["embeddings.word_embeddings.weight"].shape[0]),
        "num_query_tokens": QUERIES, "embed_dim": EMBED, "max_txt_len": MAX_TXT, "tokenizer": str(folder)}}},
        tmp_path / "m.yaml")
    common = ["--images", str(tmp_path / "imgs"), "--texts", *TEXTS[:3], "--itm_top_k", "2", "--device", "cpu"]
    assert retrieve(["--model", str(folder), "--max_txt_len", str(MAX_TXT), *common]) == 0
    expected = capsys.readouterr().out
    assert retrieve(["--lavis", str(lavis), "--vit", str(vit), "--config", str(tmp_path / "m.yaml"), *common]) == 0
    printed = capsys.readouterr().out
    assert printed == expected and "itm 0." in printed
    assert retrieve(["--lavis", str(lavis), "--config", str(tmp_path / "m.yaml"), *common]) == 2
    assert "holds no ViT (visual_encoder.*): give the EVA ViT-g file" in capsys.readouterr().err


# ---- bad input: one line naming the file and the key ------------------------------------------------
def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_a_lavis_file_with_an_unexpected_key(world, tmp_path):
    state = torch.load(world["lavis"], weights_only=True)["model"]
    state["Qformer.bert.encoder.layer.0.attention.self.surprise"] = torch.zeros(3)
    state["Qformer.bert.pooler.dense.weight"] = torch.zeros(3)  # no rule for it
    torch.save({"model": state}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as err:
        Blip2OPT.from_pretrained(tmp_path / "odd.pth", vit=world["vit"], opt=world["opt"], config=tiny(world["folder"]))
    assert _one_line(err).startswith(f"{tmp_path / 'odd.pth'}: ")
    assert "unexpected keys 1 (Qformer.bert.pooler.dense.weight)" in str(err.value)
    state.pop("Qformer.bert.pooler.dense.weight")
    torch.save({"model": state}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as err:
        Blip2OPT.from_pretrained(tmp_path / "odd.pth", vit=world["vit"], opt=world["opt"], config=tiny(world["folder"]))
    assert "unexpected keys 1 (Qformer.bert.encoder.layer.0.attention.self.surprise)" in _one_line(err)
    torch.save({"model": {**state, "t5_proj.weight": torch.zeros(2, 2)}}, tmp_path / "t5.pth")
    with pytest.raises(CheckpointError, match="FlanT5 file"):
        Blip2OPT.from_pretrained(tmp_path / "t5.pth", vit=world["vit"], opt=world["opt"])


def test_a_vit_file_of_another_size(world, tmp_path):
    from transformers import Blip2VisionConfig, Blip2VisionModel

    config = Blip2VisionConfig(hidden_size=40, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               image_size=28, patch_size=7)
    wide = randomize_(Blip2VisionModel(config))
    for layer in wide.encoder.layers:
        layer.self_attn.qkv.bias.data[40:80] = 0  # EVA has no k bias
    state = eva_state({f"vision_model.{k}": v for k, v in wide.state_dict().items()}, extra_block=False)
    torch.save(state, tmp_path / "eva_vit_l.pth")
    with pytest.raises(CheckpointError) as err:
        Blip2OPT.from_pretrained(world["lavis"], vit=tmp_path / "eva_vit_l.pth", opt=world["opt"],
                                 config=tiny(world["folder"]))
    text = _one_line(err)
    assert text.startswith(f"{tmp_path / 'eva_vit_l.pth'}: does not fit") and "wrong shapes" in text
    assert "cls_token (1, 1, 40) (expected (1, 1, 32))" in text


def test_an_opt_folder_of_another_width(world, tmp_path):
    opt = tmp_path / "opt"
    opt.mkdir()
    for f in world["opt"].iterdir():
        (opt / f.name).write_bytes(f.read_bytes())
    config = json.loads((opt / "config.json").read_text())
    (opt / "config.json").write_text(json.dumps({**config, "hidden_size": 48, "word_embed_proj_dim": 48}))
    with pytest.raises(CheckpointError) as err:
        Blip2OPT.from_pretrained(world["lavis"], vit=world["vit"], opt=opt)
    assert _one_line(err) == (
        f"{opt / 'config.json'}: an OPT of width 48, but {world['lavis']} projects the queries to 32 "
        "(opt_proj.weight (32, 24)): give the OPT folder that file was trained with")


def test_missing_companions_are_named(world):
    with pytest.raises(CheckpointError, match=r"holds no ViT \(visual_encoder\.\*\): give the EVA ViT-g file"):
        Blip2OPT.from_pretrained(world["lavis"], opt=world["opt"])
    with pytest.raises(ValueError, match="needs its OPT folder"):
        Blip2OPT.from_pretrained(world["lavis"], vit=world["vit"])
