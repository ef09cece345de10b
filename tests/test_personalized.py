"""ldm.data.personalized: DreamBooth items (crop, orientation, flips, captions) and bad folders."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torch.utils.data import DataLoader

from core.images import image_digest
from ldm.data.personalized import DreamBoothPairs, PersonalizedBase

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path, **kwargs)
    return path


def _solid(path, size=(8, 8), colour=RED):
    return _save(path, np.broadcast_to(np.array(colour, np.uint8), (size[1], size[0], 3)))


def _thirds(path):
    """A 96 x 32 PNG: red, green and blue 32 x 32 blocks from left to right."""
    blocks = [np.broadcast_to(np.array(c, np.uint8), (32, 32, 3)) for c in (RED, GREEN, BLUE)]
    return _save(path, np.concatenate(blocks, axis=1))


def _uint8(item):
    return np.rint((item["image"] + 1) * 127.5).astype(np.int64)


def test_item_format_and_captions(tmp_path):
    _solid(tmp_path / "a.png", (8, 8), GREEN)
    instance = PersonalizedBase(str(tmp_path), resolution=8, repeats=3, class_word="dog")
    assert len(instance) == 3
    item = instance[2]
    assert item["image"].dtype == np.float32 and item["image"].shape == (8, 8, 3)
    assert item["caption"] == "a photo of sks dog"
    assert np.allclose(item["image"], np.array([-1.0, 1.0, -1.0], np.float32))
    assert PersonalizedBase(str(tmp_path), resolution=8, identifier="zwx")[0]["caption"] == "a photo of zwx"
    cls = PersonalizedBase(str(tmp_path), resolution=8, class_word="dog", class_images=True)
    assert cls[0]["caption"] == "a photo of dog"
    templates = ["a photo of {identifier} {class_word}", "a rendering of a {identifier} {class_word}"]
    many = PersonalizedBase(str(tmp_path), resolution=8, repeats=40, class_word="dog", templates=templates)
    assert {many[i]["caption"] for i in range(40)} == {"a photo of sks dog", "a rendering of a sks dog"}
    cls = PersonalizedBase(str(tmp_path), resolution=8, repeats=40, class_word="dog", templates=templates, class_images=True)
    assert {cls[i]["caption"] for i in range(40)} == {"a photo of dog", "a rendering of a dog"}
    with pytest.raises(IndexError):
        many[40]


def test_images_found_recursively_in_fixed_order(tmp_path):
    for name, colour in [("b.png", GREEN), ("sub/a.png", BLUE), ("a.png", RED)]:
        _solid(tmp_path / name, (8, 8), colour)
    data = PersonalizedBase(str(tmp_path), resolution=8, repeats=2, flip_p=0.0)
    assert [p.relative_to(tmp_path).as_posix() for p in data.paths] == ["a.png", "b.png", "sub/a.png"]
    firsts = [_uint8(data[i])[0, 0].tolist() for i in range(6)]
    assert firsts == [list(RED), list(GREEN), list(BLUE)] * 2


def test_exif_orientation_six_rotates_clockwise(tmp_path):
    """Stored red top-left quadrant; EXIF orientation 6 (display rotated 90 deg clockwise) puts it top-right."""
    stored = np.zeros((32, 32, 3), np.uint8)
    stored[:16, :16] = RED
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(tmp_path / "rot.jpg", stored, exif=exif, quality=95)
    out = _uint8(PersonalizedBase(str(tmp_path), resolution=32, flip_p=0.0)[0])
    assert out[4, 27, 0] > 200 and out[4, 27, 1] < 60  # top-right red
    assert out[4, 4, 0] < 60 and out[27, 4, 0] < 60 and out[27, 27, 0] < 60


def test_rgba_and_grey_become_rgb(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[:, 4:, 3] = 255  # left half transparent -> white, right half opaque blue
    _save(tmp_path / "a.png", rgba)
    _save(tmp_path / "b.png", np.full((8, 8), 64, np.uint8))
    data = PersonalizedBase(str(tmp_path), resolution=8, flip_p=0.0, repeats=1)
    rgba_out, grey_out = _uint8(data[0]), _uint8(data[1])
    assert (rgba_out[:, :4] == 255).all() and (rgba_out[:, 4:] == [0, 0, 255]).all()
    assert grey_out.shape == (8, 8, 3) and (grey_out == 64).all()


def test_centre_crop_is_square_and_not_stretched(tmp_path):
    _thirds(tmp_path / "wide.png")
    for size in (32, 16):
        out = _uint8(PersonalizedBase(str(tmp_path), resolution=size, flip_p=0.0, interpolation="bicubic")[0])
        assert out.shape == (size, size, 3)
        assert (np.abs(out - GREEN) <= 1).all(), "a stretched image would show red and blue"


def test_random_crop_is_an_unscaled_window(tmp_path):
    ramp = np.repeat(np.arange(96, dtype=np.uint8)[None, :, None], 32, axis=0).repeat(3, axis=2)
    _save(tmp_path / "ramp.png", ramp)
    data = PersonalizedBase(str(tmp_path), resolution=32, repeats=20, flip_p=0.0, crop="random")
    lefts = set()
    for i in range(20):
        row = _uint8(data[i])[0, :, 0]
        assert (np.diff(row) == 1).all() and 0 <= row[0] <= 64
        lefts.add(int(row[0]))
    assert len(lefts) > 5


def test_real_photo_centre_crop_matches_pil(tmp_path):
    photo = skdata.chelsea()  # (300, 451, 3)
    _save(tmp_path / "cat.png", photo)
    out = PersonalizedBase(str(tmp_path), resolution=64, flip_p=0.0, interpolation="lanczos")[0]["image"]
    left = (451 - 300) // 2
    expected = Image.fromarray(photo[:, left:left + 300]).resize((64, 64), Image.Resampling.LANCZOS)
    assert np.array_equal(np.rint((out + 1) * 127.5).astype(np.uint8), np.asarray(expected))


def test_flips_and_crops_reproducible_from_seed_and_index(tmp_path):
    _thirds(tmp_path / "wide.png")
    def make(seed):
        return PersonalizedBase(str(tmp_path), resolution=32, repeats=16, crop="random", seed=seed)

    data = make(7)
    np.random.seed(1), random.seed(1), torch.manual_seed(1)
    forward = [data[i]["image"] for i in range(16)]
    np.random.seed(2), random.seed(2), torch.manual_seed(2)
    backward = [make(7)[i]["image"] for i in reversed(range(16))][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(forward, backward))
    other = make(8)
    assert not all(np.array_equal(a, other[i]["image"]) for i, a in enumerate(forward))
    val = PersonalizedBase(str(tmp_path), resolution=32, repeats=16, crop="random", seed=7, set="val")
    assert not all(np.array_equal(a, val[i]["image"]) for i, a in enumerate(forward))


def test_flip_probability(tmp_path):
    _thirds(tmp_path / "wide.png")
    def make(flip_p):
        return PersonalizedBase(str(tmp_path), resolution=32, repeats=40, flip_p=flip_p, crop="random")

    never, always, half = make(0.0), make(1.0), make(0.5)
    assert all(np.array_equal(always[i]["image"], never[i]["image"][:, ::-1]) for i in range(40))
    flipped = sum(not np.array_equal(half[i]["image"], never[i]["image"]) for i in range(40))
    assert 8 <= flipped <= 32


def test_caption_sidecars_fill_placeholders(tmp_path):
    _solid(tmp_path / "a.png")
    _solid(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("a {identifier} {class_word}\non the beach\n")
    data = PersonalizedBase(str(tmp_path), resolution=8, repeats=1, class_word="dog", caption_sidecars=True)
    assert [data[0]["caption"], data[1]["caption"]] == ["a sks dog on the beach", "a photo of sks dog"]
    with pytest.warns(UserWarning, match="not images: a.txt"):  # sidecars off: the .txt is not read
        plain = PersonalizedBase(str(tmp_path), resolution=8, repeats=1, class_word="dog")
    assert plain[0]["caption"] == "a photo of sks dog"
    (tmp_path / "b.txt").write_text("a {class_word} in the snow")
    cls = PersonalizedBase(str(tmp_path), resolution=8, repeats=1, class_images=True, class_word="dog", caption_sidecars=True)
    assert cls[1]["caption"] == "a dog in the snow"


def test_class_images_need_class_word(tmp_path):
    _solid(tmp_path / "a.png")
    with pytest.raises(ValueError, match="--class_word"):
        PersonalizedBase(str(tmp_path), resolution=8, class_images=True)
    (tmp_path / "a.txt").write_text("a photo of a dog")
    with pytest.raises(ValueError, match="--class_word"), pytest.warns(UserWarning, match="a.txt"):
        PersonalizedBase(str(tmp_path), resolution=8, class_images=True)
    data = PersonalizedBase(str(tmp_path), resolution=8, class_images=True, caption_sidecars=True)
    assert data[0]["caption"] == "a photo of a dog"


def test_missing_or_empty_data_root(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'nope'}: data_root not found")):
        PersonalizedBase(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no images"):
        PersonalizedBase(str(tmp_path))


def test_non_images_skipped_with_one_warning(tmp_path):
    _solid(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a {identifier}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.md").write_text("x")
    (tmp_path / ".DS_Store").write_text("x")
    with pytest.warns(UserWarning) as record:
        data = PersonalizedBase(str(tmp_path), resolution=8, repeats=1, caption_sidecars=True)
    assert len(record) == 1 and len(data) == 1
    message = str(record[0].message)
    assert "sub/notes.md" in message and "a.txt" not in message and ".DS_Store" not in message
    with pytest.warns(UserWarning, match="a.txt, sub/notes.md"):
        PersonalizedBase(str(tmp_path), resolution=8, repeats=1)


def test_truncated_or_fake_image_fails_by_name(tmp_path):
    _save(tmp_path / "good.jpg", skdata.chelsea()[:64, :64])
    full = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match=r"cut\.jpg: truncated or corrupt"):
        PersonalizedBase(str(tmp_path), resolution=8)
    (tmp_path / "cut.jpg").unlink()
    (tmp_path / "fake.png").write_text("not a png")
    with pytest.raises(ValueError, match=r"fake\.png: not an image"):
        PersonalizedBase(str(tmp_path), resolution=8)


def test_small_images_warned_by_name(tmp_path):
    _solid(tmp_path / "big.png", (64, 48))
    _solid(tmp_path / "tiny.png", (16, 16))
    with pytest.warns(UserWarning, match=r"1 images are smaller than resolution=32 .*: tiny\.png$"):
        data = PersonalizedBase(str(tmp_path), resolution=32)
    assert data[1]["image"].shape == (32, 32, 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"crop": "middle"}, "crop='middle'"), ({"set": "test"}, "set='test'"),
    ({"interpolation": "cubic"}, "interpolation='cubic'"), ({"flip_p": 1.5}, "flip_p=1.5"),
    ({"resolution": 0}, "resolution=0"), ({"templates": []}, "templates=")])
def test_bad_arguments(tmp_path, kwargs, message):
    _solid(tmp_path / "a.png")
    with pytest.raises(ValueError, match=message):
        PersonalizedBase(str(tmp_path), **kwargs)


def test_pairs_batch_through_default_collate(tmp_path):
    _solid(tmp_path / "inst" / "a.png", (8, 8), RED)
    for k, colour in enumerate((GREEN, BLUE, (9, 9, 9))):
        _solid(tmp_path / "cls" / f"{k}.png", (8, 8), colour)
    instance = PersonalizedBase(str(tmp_path / "inst"), resolution=8, repeats=4, class_word="dog")
    class_images = PersonalizedBase(str(tmp_path / "cls"), resolution=8, repeats=1, class_word="dog",
                                    class_images=True)
    pairs = DreamBoothPairs(instance, class_images)
    assert len(pairs) == 4
    assert np.array_equal(pairs[3]["class"]["image"], class_images[0]["image"])
    batch = next(iter(DataLoader(pairs, batch_size=4, shuffle=False)))
    images = batch["instance"]["image"]
    assert isinstance(images, torch.Tensor) and images.shape == (4, 8, 8, 3) and images.dtype == torch.float32
    assert batch["instance"]["caption"] == ["a photo of sks dog"] * 4
    assert batch["class"]["caption"] == ["a photo of dog"] * 4
    firsts = ((batch["class"]["image"][:, 0, 0] + 1) * 127.5).round().long().tolist()
    assert firsts == [list(GREEN), list(BLUE), [9, 9, 9], list(GREEN)]
    alone = next(iter(DataLoader(DreamBoothPairs(instance, None), batch_size=2)))
    assert set(alone) == {"instance"} and alone["instance"]["image"].shape == (2, 8, 8, 3)


def test_items_carry_the_digest_of_their_final_pixels(tmp_path):
    halves = np.concatenate([np.broadcast_to(np.array(c, np.uint8), (16, 8, 3)) for c in (RED, BLUE)], axis=1)
    _save(tmp_path / "halves.png", halves)  # another image when flipped
    _solid(tmp_path / "solid.png", (16, 16), GREEN)  # the same
    data = PersonalizedBase(str(tmp_path), resolution=16, repeats=40, flip_p=0.5, seed=3)
    items = [data[i] for i in range(40)]
    for item in items:
        assert item["image_digest"] == image_digest(_uint8(item).astype(np.uint8))
    by_digest = {}
    for item in items:  # equal digests <=> equal pixels: two images x (flipped or not) = 3 distinct
        by_digest.setdefault(item["image_digest"], item["image"])
        assert np.array_equal(by_digest[item["image_digest"]], item["image"])
    assert len(by_digest) == 3  # the solid image is the same flipped
    assert data[5]["image_digest"] == data[5]["image_digest"]
    batch = next(iter(DataLoader(DreamBoothPairs(data, data), batch_size=4)))
    assert batch["instance"]["image_digest"] == [items[i]["image_digest"] for i in range(4)]


def test_digests_of_tensors_of_any_dtype_and_of_arrays_are_apart():
    x = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)) * 255
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.uint8):
        t = x.to(dtype)
        assert image_digest(t) == image_digest(t.clone()) != image_digest(t.flip(2))
    assert image_digest(x) != image_digest(x.numpy()) != image_digest(x.to(torch.float64))
    assert image_digest(x.bfloat16()) != image_digest(x.half())
