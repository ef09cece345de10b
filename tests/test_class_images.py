"""The sampling callbacks: class images for prior preservation (reproducible per index, split across
ranks, resumable, atomic) and the training-time sample grids. Ranks are simulated by threads that
share a real barrier, each with its own copy of the model."""
import contextlib
import copy
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import ldm.callbacks.class_images as class_images
from ldm.callbacks.image_logger import ImageLogger
from ldm.callbacks.class_images import ClassImageSampler
from ldm.modules.ema import LitEma
from tests.sd_fixtures import tiny_model

STEPS, N = 2, 3


class FakeStrategy:
    def __init__(self, barrier: threading.Barrier | None = None):
        self.calls, self._barrier = 0, barrier

    def barrier(self, name: str | None = None) -> None:
        self.calls += 1
        if self._barrier is not None:
            self._barrier.wait(timeout=300)


def fake_trainer(rank: int = 0, world: int = 1, barrier: threading.Barrier | None = None, **extra):
    return SimpleNamespace(global_rank=rank, world_size=world, strategy=FakeStrategy(barrier),
                           precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext), **extra)


class Recording(ClassImageSampler):
    """Remembers which indices it generated."""

    def generate(self, model, indices, progress=False, class_set=None):
        self.made = list(indices)
        return super().generate(model, indices, progress, class_set)


def sampler(root: Path, **params) -> Recording:
    return Recording(str(root), "dog", **{"num_class_images": N, "ddim_steps": STEPS, "batch_size": 2, **params})


def read(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to the float rounding of batched kernels: a few pixels off by one level at most."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def everything(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3).train()


@pytest.fixture(scope="module")
def reference_folder(model, tmp_path_factory):
    """N class images made in one batch."""
    folder = tmp_path_factory.mktemp("reference")
    sampler(folder, batch_size=N).on_fit_start(fake_trainer(), model)
    return folder


@pytest.fixture(scope="module")
def reference(reference_folder):
    return read(reference_folder)


def test_makes_the_missing_images_named_by_index_with_prompt_and_seed(reference_folder, reference):
    assert everything(reference_folder) == [f"class_{i:05d}.png" for i in range(N)]
    for i, name in enumerate(reference):
        png = Image.open(reference_folder / name)
        png.load()
        assert png.size == (32, 32) and png.mode == "RGB"
        assert png.text["prompt"] == "a photo of a dog" and png.text["seed"] == str(i)
    assert not np.array_equal(reference["class_00000.png"], reference["class_00001.png"])


def test_leaves_the_global_rng_the_train_mode_and_the_weights_as_they_were(model, reference, tmp_path):
    state, weights = torch.get_rng_state(), [p.detach().clone() for p in model.parameters()]
    trainer = fake_trainer()
    made = sampler(tmp_path / "class", num_class_images=1)
    made.on_fit_start(trainer, model)
    assert made.made == [0] and trainer.strategy.calls == 2  # before writing and after
    assert torch.equal(torch.get_rng_state(), state) and model.training
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert_same_image(read(tmp_path / "class")["class_00000.png"], reference["class_00000.png"])


def test_image_i_depends_only_on_its_seed_not_on_batch_size_or_rank(model, reference, tmp_path):
    barrier, ranks = threading.Barrier(2), [sampler(tmp_path / "ddp", batch_size=1) for _ in range(2)]
    errors = []

    def rank(r: int) -> None:
        torch.manual_seed(1000 + r)
        try:
            ranks[r].on_fit_start(fake_trainer(r, 2, barrier), copy.deepcopy(model))
        except Exception as err:  # surfaced below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [ranks[0].made, ranks[1].made] == [[0, 2], [1]]
    made = read(tmp_path / "ddp")
    assert list(made) == list(reference)
    for name in reference:
        assert_same_image(made[name], reference[name])

    shifted = sampler(tmp_path / "shift", num_class_images=1, base_seed=1)
    shifted.on_fit_start(fake_trainer(), model)
    assert_same_image(read(tmp_path / "shift")["class_00000.png"], reference["class_00001.png"])


def test_each_concept_fills_its_own_class_folder_with_its_class_word_count_and_prompt(model, reference, tmp_path):
    dog, cat = tmp_path / "dog", tmp_path / "cat"
    concepts = [{"data_root": "a", "identifier": "sks", "class_word": "dog", "class_data_root": str(dog)},
                {"data_root": "b", "identifier": "ohwx", "class_word": "dog", "class_data_root": str(dog)},
                {"data_root": "c", "identifier": "zwx", "class_word": "cat", "class_data_root": str(cat),
                 "num_class_images": 1, "class_prompt": "a drawing of a {class_word}"}]
    made = []

    class PerFolder(ClassImageSampler):
        def generate(self, model, indices, progress=False, class_set=None):
            made.append((Path(class_set.root).name, list(indices)))
            return super().generate(model, indices, progress, class_set)

    trainer = fake_trainer()
    PerFolder(None, None, num_class_images=N, ddim_steps=STEPS, batch_size=2, concepts=concepts).on_fit_start(
        trainer, model)
    assert made == [("dog", [0, 1, 2]), ("cat", [0])]  # a shared folder is filled once
    assert trainer.strategy.calls == 2
    dogs = read(dog)
    assert list(dogs) == list(reference)  # the single-subject sampler's images of "a photo of a dog"
    for name in reference:
        assert_same_image(dogs[name], reference[name])
    assert everything(cat) == ["class_00000.png"]
    png = Image.open(cat / "class_00000.png")
    png.load()
    assert png.text["prompt"] == "a drawing of a cat" and png.text["seed"] == "0"


def test_an_interrupted_run_resumes_without_touching_what_was_written(model, reference, tmp_path, monkeypatch):
    folder, real_save, saved = tmp_path / "class", class_images.save_png, []

    def save_then_die(image, path, info):
        if saved:
            raise KeyboardInterrupt("killed")
        saved.append(path)
        return real_save(image, path, info)

    monkeypatch.setattr(class_images, "save_png", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        sampler(folder).on_fit_start(fake_trainer(), model)
    assert everything(folder) == ["class_00000.png"]  # no temporary files left behind
    first = folder / "class_00000.png"
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    monkeypatch.setattr(class_images, "save_png", real_save)
    resumed = sampler(folder)
    resumed.on_fit_start(fake_trainer(), model)
    assert resumed.made == [1, 2] and everything(folder) == list(reference)
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    for name, image in read(folder).items():
        assert_same_image(image, reference[name])
    again = sampler(folder)
    again.on_fit_start(fake_trainer(), model)
    assert not hasattr(again, "made")


def test_a_run_killed_inside_a_batch_resumes_to_the_same_bytes(model, tmp_path, monkeypatch):
    """The resumed run samples the interrupted batch whole again: the files equal an uninterrupted
    run's byte for byte (a batch of one would round differently)."""
    whole = tmp_path / "whole"
    sampler(whole).on_fit_start(fake_trainer(), model)
    folder, real_save = tmp_path / "class", class_images.save_png

    def die_after_first(image, path, info):
        if path.name != "class_00000.png":
            raise KeyboardInterrupt("killed")
        return real_save(image, path, info)

    monkeypatch.setattr(class_images, "save_png", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        sampler(folder).on_fit_start(fake_trainer(), model)
    monkeypatch.setattr(class_images, "save_png", real_save)
    resumed = sampler(folder)
    resumed.on_fit_start(fake_trainer(), model)
    assert resumed.made == [1, 2] and class_images.blocks([1, 2], 2) == [([0, 1], [1]), ([2], [2])]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {p.name: p.read_bytes() for p in whole.iterdir()}


def test_images_of_any_name_count_and_a_missing_class_word_is_one_clear_error(model, tmp_path):
    folder = tmp_path / "pre-generated"
    folder.mkdir()
    for name in ("a.jpg", "b.png", "c.webp"):
        Image.new("RGB", (8, 8)).save(folder / name)
    done = ClassImageSampler(str(folder), None, num_class_images=3)
    done.on_fit_start(fake_trainer(), model)  # enough images: no class word needed, nothing made
    assert everything(folder) == ["a.jpg", "b.png", "c.webp"]
    with pytest.raises(ValueError, match=r"pre-generated: 1 class images are missing .* --class_word"):
        ClassImageSampler(str(folder), None, num_class_images=4).on_fit_start(fake_trainer(), model)
    off = fake_trainer()
    ClassImageSampler(None, None).on_fit_start(off, model)
    assert off.strategy.calls == 0
    with pytest.raises(ValueError, match="needs a '{}' for the class word"):
        ClassImageSampler(str(folder), "dog", prompt="a photo of a dog")


def test_the_ema_weights_make_the_images(model, reference, tmp_path):
    ema_model = copy.deepcopy(model)
    ema_model.use_ema, ema_model.model_ema = True, LitEma(ema_model.model)
    with torch.no_grad():
        for b in ema_model.model_ema.buffers():
            if b.is_floating_point() and b.ndim > 0:
                b.mul_(0.5)
    sampler(tmp_path / "ema", num_class_images=1).on_fit_start(fake_trainer(), ema_model)
    assert ema_model.training
    copied = copy.deepcopy(model)
    with torch.no_grad():
        ema_model.model_ema.copy_to(copied.model)
    sampler(tmp_path / "copied", num_class_images=1).on_fit_start(fake_trainer(), copied)
    ema = read(tmp_path / "ema")["class_00000.png"]
    np.testing.assert_array_equal(ema, read(tmp_path / "copied")["class_00000.png"])
    assert not np.array_equal(ema, reference["class_00000.png"])


class Experiment:
    def __init__(self):
        self.images = []

    def add_image(self, tag, image, step, dataformats):
        self.images.append((tag, image, step, dataformats))


def test_image_logger_writes_grids_every_n_steps_on_rank_zero(model, tmp_path):
    experiment = Experiment()
    logger = ImageLogger(every_n_steps=2, prompts=["a photo of sks dog", "a photo of a dog"], ddim_steps=STEPS,
                         n_per_prompt=1, logdir=str(tmp_path))
    trainer = fake_trainer(global_step=1, should_stop=False, loggers=[SimpleNamespace(experiment=experiment)],
                           default_root_dir=str(tmp_path / "unused"))
    state = torch.get_rng_state()
    for step in (1, 2, 2):  # the second 2: an accumulation batch without an optimizer step
        trainer.global_step = step
        logger.on_train_batch_end(trainer, model, None, None, 0)
    logger.on_train_end(trainer, model)
    assert torch.equal(torch.get_rng_state(), state) and model.training
    assert everything(tmp_path / "images") == ["step-000002"]
    folder = tmp_path / "images" / "step-000002"
    assert everything(folder) == ["000.png", "001.png", "grid.png"]
    grid = read(folder)["grid.png"]
    assert grid.shape[0] == 2 * 34 + 2 and grid.shape[1] > 2 * (34 + 2)  # a row per prompt, labelled
    strip = grid[:, :grid.shape[1] - (34 + 2)]
    assert all((strip[2 + r * 34: 2 + r * 34 + 32] < 128).any() for r in range(2))  # each row's prompt written
    assert [(tag, step, fmt) for tag, _, step, fmt in experiment.images] == [("samples", 2, "HWC")]
    np.testing.assert_array_equal(experiment.images[0][1], grid)
    assert Image.open(folder / "001.png").text["prompt"] == "a photo of a dog"
    trainer.global_step, trainer.should_stop = 3, True  # stopped by a signal: save, do not sample
    logger.on_train_end(trainer, model)
    assert everything(tmp_path / "images") == ["step-000002"]
    trainer.should_stop = False
    logger.on_train_end(trainer, model)
    assert everything(tmp_path / "images") == ["step-000002", "step-000003"]
    other = fake_trainer(1, 2, global_step=4, should_stop=False, loggers=[], default_root_dir=str(tmp_path))
    logger.on_train_batch_end(other, model, None, None, 0)
    assert everything(tmp_path / "images") == ["step-000002", "step-000003"]


def test_precision_bf16_samples_under_autocast_and_fp32_is_plain_txt2img(model, reference, tmp_path):
    bf16 = sampler(tmp_path / "bf16", batch_size=N, precision="bf16")
    bf16.on_fit_start(fake_trainer(), model)
    images = read(tmp_path / "bf16")
    assert list(images) == list(reference) and all(im.dtype == np.uint8 and im.shape == (32, 32, 3)
                                                   for im in images.values())
    assert any(not np.array_equal(images[k], reference[k]) for k in images)  # bf16 rounding shows
    sampler(tmp_path / "fp32", batch_size=N, precision="fp32").on_fit_start(fake_trainer(), model)
    with class_images.sampling_mode(model):
        plain = class_images.txt2img(model, ["a photo of a dog"] * N, list(range(N)), 32, 32, STEPS, 7.5)
    fp32 = read(tmp_path / "fp32")
    assert all(np.array_equal(fp32[k], reference[k]) and np.array_equal(fp32[k], plain[i])
               for i, k in enumerate(reference))


def test_precision_fp16_on_cpu_and_a_bad_name_are_one_clear_error(model, tmp_path):
    with pytest.raises(ValueError, match=r"^ClassImageSampler: precision=fp16 needs a CUDA device; on CPU use bf16"):
        sampler(tmp_path / "fp16", precision="fp16").on_fit_start(fake_trainer(), model)
    assert not (tmp_path / "fp16").exists()
    with pytest.raises(ValueError, match=r"^ClassImageSampler: precision='fp64': expected one of fp32, bf16, fp16$"):
        sampler(tmp_path, precision="fp64")
