"""The toy world's BLIP-2 captioner (toy/captioner.py, toy/judge.py, configs/toy/vit.yaml and
configs/toy/blip2.yaml, models/toy/blip2): the shipped weights' caption accuracy on held-out shapes,
their transformers twin, the caption tokenizer, the data sets, both stages through main.py (the
captioner on the frozen ViT of stage 1), and the image embeddings."""
import itertools

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from blip2.data.captions import collate
from blip2.losses.caption_lm import CAPTION_END
from blip2.modules.blip2_opt import newline_token_id
from blip2.processors import Blip2ImageProcessor
from core.weights import CheckpointError
from toy.captioner import ATTRIBUTE_VALUES, ToyAttributes, ToyBlip2Finetune, ToyCaptions, train_tokenizer
from toy.judge import (
    TOY_CAPTIONER,
    TOY_GENERATION,
    TOY_PROMPT,
    caption_accuracy,
    caption_images,
    embed_images,
    load_captioner,
    parse_caption,
)
from toy.shapes import ATTRIBUTES, render, scene_of
from tests._util import rel_err
from tests.blip2_fixtures import load_reference, one_torch_thread
from tests.main_helpers import read_all_scalars, read_scalars, run_dirs, run_main
from tests.sd_fixtures import ROOT

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
CONFIG = ROOT / "configs" / "toy" / "blip2.yaml"
VIT_CONFIG = ROOT / "configs" / "toy" / "vit.yaml"
# Issue 14's bar for the judge, on 300 held-out test images (seed 0): each attribute >= 0.97, all three
# at once >= 0.95. The shipped weights measured: see configs/toy/blip2.yaml. Captions are deterministic.
MIN_EXACT, MIN_ATTRIBUTE = 0.95, 0.97


@pytest.fixture(scope="module")
def captioner():
    return load_captioner()


# ---- the shipped captioner -------------------------------------------------------------------------
def test_shipped_captioner_accuracy_on_held_out_shapes(captioner):
    scores = caption_accuracy(captioner, split="test", num=300, seed=0)
    print(scores)
    assert scores["num"] == 300 and scores["exact"] >= MIN_EXACT
    assert all(scores[a] >= MIN_ATTRIBUTE for a in ATTRIBUTES)
    assert scores["exact"] <= min(scores[a] for a in ATTRIBUTES)


def test_shipped_folder_is_small_and_loads_in_transformers(captioner):
    assert sum(p.stat().st_size for p in TOY_CAPTIONER.iterdir()) <= 5 * 2**20
    ref = load_reference(TOY_CAPTIONER)
    scenes = [scene_of("test", 0, i) for i in range(4)]
    pixels = Blip2ImageProcessor(32)([render(s) for s in scenes])
    ids, mask = captioner.tokenize([s.caption() for s in scenes], 4)
    q = ref.config.num_query_tokens
    image_ids = torch.full((4, q), ref.config.image_token_index)
    with torch.no_grad():
        expected = ref(pixel_values=pixels, input_ids=torch.cat([image_ids, ids], 1),
                       attention_mask=torch.cat([torch.ones(4, q, dtype=mask.dtype), mask], 1)).logits
        logits = captioner(pixels, ids, mask)
    valid = torch.cat([torch.ones(4, q, dtype=torch.bool), mask.bool()], 1)
    assert rel_err(logits[valid], expected[valid]) <= 1e-5


# ---- the tokenizer ---------------------------------------------------------------------------------
def test_tokenizer_newline_is_one_token_and_captions_round_trip(tmp_path, captioner):
    tok = train_tokenizer(tmp_path / "tok")
    assert (tok.bos_token, tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == ("</s>", 2, 1,
                                                                                                         2, 3)
    assert len(tok(CAPTION_END, add_special_tokens=False)["input_ids"]) == 1 and newline_token_id(tok) > 3
    for i in range(50):
        caption = scene_of("val", 0, i).caption()
        ids = tok(caption + CAPTION_END)["input_ids"]
        assert ids[0] == 2 and tok.decode(ids, skip_special_tokens=True) == caption + CAPTION_END
        assert len(ids) == 1 + len(caption.split()) + 1  # bos, one token a word, "\n"
    assert tok.get_vocab() == captioner.tokenizer.get_vocab()  # the shipped one, reproduced
    cfg = OmegaConf.load(CONFIG)
    assert cfg.model.params.config.text_config.vocab_size == len(tok)
    assert cfg.model.params.config.image_token_index == tok.convert_tokens_to_ids("<image>") == len(tok) - 1
    assert cfg.model.params.prompt == TOY_PROMPT and dict(cfg.model.params.generation) == TOY_GENERATION


# ---- the data set ----------------------------------------------------------------------------------
def test_dataset_is_deterministic_and_eval_items_carry_references():
    train, again = ToyCaptions("train", 8, "train"), ToyCaptions("train", 8, "train")
    item = train[3]
    assert item["image"].shape == (3, 32, 32) and item["text_input"] == scene_of("train", 0, 3).caption()
    assert torch.equal(item["image"], again[3]["image"]) and not torch.equal(item["image"], train[4]["image"])
    expected = Blip2ImageProcessor(32)([render(scene_of("train", 0, 3))])[0]
    assert torch.equal(item["image"], expected)
    assert abs(float(item["image"].mean())) < 3  # CLIP-normalised, not [0, 255]
    evals = ToyCaptions("test", 4, "eval", seed=1)
    batch = collate([evals[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image_id"][2] == "test/1/2"
    assert batch["references"] == [[scene_of("test", 1, i).caption()] for i in range(4)]
    assert not torch.equal(evals[0]["image"], ToyCaptions("test", 4, "eval", seed=0)[0]["image"])
    with pytest.raises(IndexError):
        evals[4]
    with pytest.raises(ValueError, match="split"):
        ToyCaptions("holdout", 4)


def test_attribute_items_label_the_scene_they_show():
    data = ToyAttributes("train", 6)
    for i in range(6):
        scene, item = scene_of("train", 0, i), data[i]
        assert torch.equal(item["image"], ToyCaptions("train", 6)[i]["image"])
        assert [ATTRIBUTE_VALUES[a][int(k)] for a, k in zip(ATTRIBUTES, item["labels"])] == \
            [getattr(scene, a) for a in ATTRIBUTES]
    assert {a: len(v) for a, v in ATTRIBUTE_VALUES.items()} == {"colour": 5, "shape": 3, "background": 2}


# ---- the two stages through main.py ----------------------------------------------------------------
def _train(tmp_path, config, name, *overrides):
    res = run_main(["--base", str(config), "-t", "-l", str(tmp_path / "logs"), "-n", name,
                    "data.params.train.params.num=12", "data.params.validation.params.num=4",
                    "lightning.trainer.max_steps=3", "lightning.trainer.log_every_n_steps=1",
                    "model.params.scheduler_config.params.warm_up_steps=1", *overrides],
                   cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    [run] = [r for r in run_dirs(tmp_path / "logs") if r.name.endswith(name)]
    return run, torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_config_trains_through_main(tmp_path):
    vit_run, vit = _train(tmp_path, VIT_CONFIG, "vit", "data.params.batch_size=4")
    assert vit["global_step"] == 3 and np.isfinite(list(read_scalars(vit_run, "train/loss").values())).all()
    assert {f"val/acc_{a}" for a in ATTRIBUTES} <= set(read_all_scalars(vit_run))
    run, ckpt = _train(tmp_path, CONFIG, "toy", f"toy.tokenizer={ROOT / 'models/toy/blip2-tokenizer'}",
                       f"toy.vit={vit_run / 'checkpoints' / 'last.ckpt'}", "data.params.batch_size=4")
    assert ckpt["global_step"] == 3 and ckpt["blip2_config"]["vision_config"]["patch_size"] == 4
    # the captioner's ViT is stage 1's, frozen; its ln_vision trains (as in BLIP-2)
    state, start = ckpt["state_dict"], vit["state_dict"]
    blocks = [k for k in start if k.startswith("vit.") and "post_layernorm" not in k]
    assert blocks and all(torch.equal(state["model.vision_model." + k[4:]], start[k]) for k in blocks)
    assert not torch.equal(state["model.vision_model.post_layernorm.weight"], start["vit.post_layernorm.weight"])
    losses = read_scalars(run, "train/loss")
    assert len(losses) == 3 and all(np.isfinite(list(losses.values())))
    assert max(losses.values()) < 10  # N(0, 0.02) initialisation: about log(vocab) = 5.8, not ~60
    assert len(read_scalars(run, "val/cider")) >= 1  # validation captions the eval items


def test_a_new_captioner_needs_its_vit_and_a_wrong_file_is_named(tmp_path):
    cfg = OmegaConf.load(CONFIG)
    cfg.toy.tokenizer = str(ROOT / "models/toy/blip2-tokenizer")
    params = OmegaConf.to_container(cfg.model.params, resolve=True)  # toy.vit: null
    with pytest.raises(ValueError, match="vision_checkpoint.*configs/toy/vit.yaml"):
        ToyBlip2Finetune(**params)
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"state_dict": {"model.vision_model.post_layernorm.weight": torch.ones(96)}}, wrong)
    with pytest.raises(CheckpointError, match="wrong.ckpt: no vit"):
        ToyBlip2Finetune(**{**params, "vision_checkpoint": str(wrong)})
    torch.save({"state_dict": {"vit.post_layernorm.weight": torch.ones(64)}}, wrong)
    with pytest.raises(CheckpointError, match="wrong.ckpt.*post_layernorm.weight"):
        ToyBlip2Finetune(**{**params, "vision_checkpoint": str(wrong)})
    with pytest.raises(ValueError, match="vision_checkpoint=.*with pretrained=.*give one of them"):
        ToyBlip2Finetune(**{**params, "vision_checkpoint": str(wrong), "pretrained": str(TOY_CAPTIONER)})


# ---- the image embeddings ------------------------------------------------------------------------
def test_embeddings_are_unit_and_group_by_attributes(captioner):
    scenes = [scene_of("test", 0, i) for i in range(120)]
    emb = embed_images(captioner, [render(s) for s in scenes], batch_size=50)
    assert emb.shape == (120, captioner.language_model.lm_head.in_features)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(120), atol=1e-5)
    sim = emb @ emb.T
    same, differ = [], {a: [] for a in ATTRIBUTES}
    for i, j in itertools.combinations(range(120), 2):
        diff = [a for a in ATTRIBUTES if getattr(scenes[i], a) != getattr(scenes[j], a)]
        if not diff:
            same.append(sim[i, j].item())
        elif len(diff) == 1:
            differ[diff[0]].append(sim[i, j].item())
    print({"same": np.mean(same), **{a: np.mean(v) for a, v in differ.items()}})
    assert len(same) > 50 and all(np.mean(same) > np.mean(v) for v in differ.values())


def test_captions_are_full_and_independent_of_batching(captioner):
    images = [render(scene_of("test", 0, i)) for i in range(10)]
    captions = caption_images(captioner, images)
    assert caption_images(captioner, images, batch_size=3) == captions
    assert all(None not in parse_caption(c).values() for c in captions)  # every caption names all three


def test_div_is_the_mean_pairwise_embedding_distance(captioner):
    from toy.evaluate import mean_pairwise_distance

    images = [render(scene_of("test", 0, i)) for i in range(6)]
    emb = embed_images(captioner, images)
    pairs = [1 - (emb[i] @ emb[j]).item() for i, j in itertools.permutations(range(6), 2)]
    assert mean_pairwise_distance(captioner, images) == pytest.approx(np.mean(pairs), abs=1e-6)
    assert mean_pairwise_distance(captioner, [images[0]] * 4) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_distance(captioner, images[:1])
