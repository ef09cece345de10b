"""The toy world's data (toy/shapes.py) and its KL-autoencoder training system."""
import numpy as np
import pytest
import torch
from PIL import Image

from toy.shapes import (
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLOURS,
    SHAPES,
    SUBJECT,
    SUBJECT2,
    ShapesDataset,
    render,
    scene_of,
    subject_scene,
)
from toy.shapes import main as shapes_main
from toy import ROOT
from toy.judge import parse_caption
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.autoencoder_training import AutoencoderKLTraining

DDCONFIG = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def test_items_are_a_function_of_split_seed_and_index():
    a, b = ShapesDataset("train", 50, seed=0), ShapesDataset("train", 50, seed=0)
    assert all(np.array_equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"] for i in (0, 7, 49))
    assert a[3]["image"].shape == (32, 32, 3) and a[3]["image"].dtype == np.float32
    assert -1.0 <= a[3]["image"].min() and a[3]["image"].max() <= 1.0
    train = {ShapesDataset("train", 200)[i]["image"].tobytes() for i in range(200)}
    test = {ShapesDataset("test", 200)[i]["image"].tobytes() for i in range(200)}
    assert not train & test  # held out
    assert ShapesDataset("train", 5, seed=1)[0]["caption"] != ShapesDataset("train", 5, seed=0)[0]["caption"] or \
        not np.array_equal(ShapesDataset("train", 5, seed=1)[0]["image"], ShapesDataset("train", 5, seed=0)[0]["image"])
    with pytest.raises(ValueError, match="split='dev'"):
        ShapesDataset("dev")
    with pytest.raises(IndexError):
        a[50]


def test_attributes_are_uniform_and_drawn_as_captioned():
    scenes = [scene_of("train", 0, i) for i in range(3000)]
    for name, values in (("colour", COLOURS), ("shape", SHAPES), ("background", BACKGROUNDS)):
        counts = np.array([sum(getattr(s, name) == v for s in scenes) for v in values])
        assert counts.min() > 0.8 * len(scenes) / len(values), (name, counts)
    for s in scenes[:40]:
        pixels = np.asarray(render(s, 32)).reshape(-1, 3).astype(int)
        centre = np.asarray(render(s, 32))[int(s.cy * 32), int(s.cx * 32)].astype(int)
        assert np.abs(centre - COLOURS[s.colour]).max() <= 12  # the shape's colour at its centre
        assert (np.abs(pixels - BACKGROUNDS[s.background]).max(1) <= 3).mean() > 0.4  # mostly background
        assert parse_caption(s.caption()) == {"colour": s.colour, "shape": s.shape, "background": s.background}


def test_varied_captions_keep_the_shape_and_drop_out():
    ds = ShapesDataset("train", 2000, captions="varied", caption_dropout=0.1)
    caps = [ds[i]["caption"] for i in range(2000)]
    empty = sum(c == "" for c in caps) / len(caps)
    assert 0.07 < empty < 0.13
    assert all(parse_caption(c)["shape"] for c in caps if c)
    assert {"a circle", "a red square", "a triangle on a black background"} <= set(caps)
    assert abs(sum(p for _, p in CAPTION_TEMPLATES) - 1.0) < 1e-9


def test_subject_is_distinct_and_written_by_the_cli(tmp_path):
    photo = np.asarray(render(subject_scene(0), 32)).astype(int)
    s = subject_scene(0)
    assert (s.colour, s.shape, s.background) == (SUBJECT["colour"], SUBJECT["shape"], SUBJECT["background"])
    assert np.abs(photo[int(s.cy * 32), int(s.cx * 32)] - (240, 205, 40)).max() <= 20  # the yellow dot
    assert not any(scene_of("train", 0, i).dot for i in range(500))
    assert shapes_main(["--subject", str(tmp_path / "subject"), "--num", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "subject").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert shapes_main(["--out", str(tmp_path / "test"), "--split", "test", "--num", "2"]) == 0
    assert (tmp_path / "test" / "captions.jsonl").read_text().count("\n") == 2


def test_second_subject_differs_in_every_named_attribute_and_its_photos_are_the_shipped_ones(tmp_path):
    s = subject_scene(0, subject=1)
    assert (s.colour, s.shape, s.background) == (SUBJECT2["colour"], SUBJECT2["shape"], SUBJECT2["background"])
    assert all(SUBJECT[a] != SUBJECT2[a] for a in ("colour", "shape", "background", "class_word"))
    photo = np.asarray(render(s, 32)).astype(int)
    assert np.abs(photo[int(s.cy * 32), int(s.cx * 32)] - SUBJECT2["dot"]).max() <= 20  # its white dot
    assert shapes_main(["--subject", str(tmp_path / "second"), "--num", "4", "--which", "2"]) == 0
    shipped = sorted((ROOT / "data" / "toy_subject2").glob("*.png"))
    assert [p.name for p in shipped] == sorted(p.name for p in (tmp_path / "second").iterdir())
    for p in shipped:
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "second" / p.name)))


def test_autoencoder_training_loss_and_keys(tmp_path):
    torch.manual_seed(0)
    module = AutoencoderKLTraining(DDCONFIG, embed_dim=4, kl_weight=1e-3)
    assert set(module.state_dict()) == set(AutoencoderKL(DDCONFIG, embed_dim=4).state_dict())
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1}
    torch.manual_seed(1)
    loss, logs = module.losses(module.get_input(batch), "train")
    torch.manual_seed(1)
    x = batch["image"].permute(0, 3, 1, 2)
    posterior = module.encode(x)
    x_hat = module.decode(posterior.sample())
    kl = 0.5 * (posterior.mean ** 2 + posterior.var - 1 - posterior.logvar).sum((1, 2, 3))
    expected = (x - x_hat).abs().sum((1, 2, 3)).mean() + 1e-3 * kl.mean()
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(logs["train/l1_per_pixel"], (x - x_hat).abs().mean(), rtol=1e-5)
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": module.state_dict(), "global_step": 3}, path)
    loaded = AutoencoderKL(DDCONFIG, embed_dim=4, ckpt_path=str(path))  # a run's last.ckpt is a first stage
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_open_palette_items_widen_the_autoencoder_world():
    from toy.shapes import open_palette_scene
    plain, mixed = ShapesDataset("train", 400), ShapesDataset("train", 400, open_palette=0.5)
    named = {tuple(c) for c in list(COLOURS.values()) + list(BACKGROUNDS.values())}

    def named_corners(ds, i):  # the background colour at a corner is a named one
        corner = tuple(int(round(v)) for v in (ds[i]["image"][0, 0] + 1) * 127.5)
        return any(max(abs(a - b) for a, b in zip(corner, c)) <= 2 for c in named)
    assert all(named_corners(plain, i) for i in range(100))
    share = 1 - sum(named_corners(mixed, i) for i in range(400)) / 400
    assert 0.4 < share < 0.6
    scenes = [open_palette_scene(np.random.default_rng(i)) for i in range(200)]
    assert 0.35 < np.mean([s.dot for s in scenes]) < 0.65 and all(s.palette for s in scenes)


def _scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    values = []
    for events in sorted((logdir / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        values += [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []
    return values


def test_vae_config_trains_through_main_and_resume_without_t_validates_the_saved_weights(tmp_path):
    from core import trainer
    small = ["data.params.batch_size=4", "data.params.validation.params.num=4", "lightning.trainer.max_steps=3",
             "lightning.trainer.val_check_interval=3", "lightning.trainer.log_every_n_steps=1",
             "model.params.ddconfig.ch_mult=[1,2]"]
    argv = ["--base", "configs/toy/vae.yaml", "-t", "-n", "vae", "--logdir", str(tmp_path)] + small
    assert trainer.main(argv) == 0
    logdir = next(tmp_path.glob("*_vae"))
    trained = _scalars(logdir, "val/l1_per_pixel")
    assert trained and len(_scalars(logdir, "train/loss")) == 3
    assert AutoencoderKL({**DDCONFIG}, 4, ckpt_path=str(logdir / "checkpoints" / "last.ckpt"))  # a first stage
    assert trainer.main(["-r", str(logdir)]) == 0  # no -t: validate the resumed weights
    again = _scalars(logdir, "val/l1_per_pixel")
    assert len(again) == len(trained) + 1 and abs(again[-1] - trained[-1]) < 1e-6


def test_toy_dreambooth_fine_tunes_the_toy_base_model_as_it_was_built():
    from omegaconf import OmegaConf
    base = OmegaConf.to_container(OmegaConf.load("configs/toy/sd.yaml").model.params)
    dreambooth = OmegaConf.to_container(OmegaConf.load("configs/toy/dreambooth.yaml").model.params)
    base["first_stage_config"]["params"].pop("ckpt_path")
    only_base = {"cond_stage_trainable"}
    only_dreambooth = {"prior_loss_weight", "train_text_encoder", "text_encoder_lr", "cache_latents", "ckpt_path",
                       "separate_forwards", "optimizer"}  # how it trains, not what it is
    assert {k: v for k, v in base.items() if k not in only_base} == \
        {k: v for k, v in dreambooth.items() if k not in only_dreambooth}


def test_attribute_scores_count_each_attribute_and_exact_matches():
    from toy.judge import attribute_scores
    wanted = [{"colour": "red", "shape": "circle", "background": "white"}] * 4
    read = [parse_caption(c) for c in ("a red circle on a white background", "a red square on a white background",
                                       "a blue circle", "a red circle on a black background")]
    assert attribute_scores(read, wanted) == {"exact": 0.25, "colour": 0.75, "shape": 0.75, "background": 0.5}
    with pytest.raises(ValueError, match="expected equal"):
        attribute_scores(read[:2], wanted)
