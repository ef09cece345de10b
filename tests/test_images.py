"""core.images: every PIL mode becomes the expected 8-bit RGB, and bad files fail by name."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.images import ImageLoadError, is_image_file, list_images, load_rgb, make_grid, to_rgb


def _rgb(path) -> np.ndarray:
    image = load_rgb(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


def test_rgba_and_la_composite_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (200, 10, 20, 255)  # opaque: kept
    rgba[0, 1] = (200, 10, 20, 0)  # transparent: white
    rgba[0, 2] = (0, 0, 0, 128)  # half: 255 * (1 - 128/255) = 127
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = _rgb(tmp_path / "a.png")
    assert out[0, 0].tolist() == [200, 10, 20]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert np.abs(out[0, 2] - 127).max() <= 1
    la = np.stack([np.full((3, 3), 40, np.uint8), np.array([[255, 0, 255]] * 3, np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = _rgb(tmp_path / "la.png")
    assert out[:, 0].tolist() == [[40, 40, 40]] * 3 and out[:, 1].tolist() == [[255, 255, 255]] * 3


def test_palette_with_and_without_transparency(tmp_path):
    palette = [10, 20, 30, 250, 0, 0] + [0] * (256 * 3 - 6)
    image = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    image.putpalette(palette)
    image.save(tmp_path / "p.png")
    assert _rgb(tmp_path / "p.png")[0].tolist() == [[10, 20, 30], [250, 0, 0]]
    image.save(tmp_path / "pt.png", transparency=1)
    assert _rgb(tmp_path / "pt.png")[0].tolist() == [[10, 20, 30], [255, 255, 255]]
    image.save(tmp_path / "pt.gif", transparency=0)
    assert _rgb(tmp_path / "pt.gif")[0].tolist() == [[255, 255, 255], [250, 0, 0]]


def test_grey_cmyk_and_one_bit(tmp_path):
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    Image.fromarray(grey, "L").save(tmp_path / "g.jpg", quality=95)
    out = _rgb(tmp_path / "g.jpg")
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert np.abs(out[..., 0] - grey).max() <= 8
    cmyk = np.array([[[255, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 255]]], np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    assert _rgb(tmp_path / "c.tif")[0].tolist() == [[0, 255, 255], [255, 255, 255], [0, 0, 0]]
    Image.fromarray(np.array([[True, False]])).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    assert _rgb(tmp_path / "b.png")[0].tolist() == [[255, 255, 255], [0, 0, 0]]


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I;16", ".tif"), ("I;16B", ".tif"), ("I", ".tif")])
def test_sixteen_bit_scaled_not_clipped(tmp_path, mode, suffix):
    k = np.arange(256).reshape(16, 16)
    offset = np.where(k % 2 == 1, 128, -128) * (k > 0) * (k < 255)  # still rounds to k
    v = k * 257 + offset
    arr = v.astype({"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode])
    Image.frombytes(mode, (16, 16), arr.tobytes()).save(tmp_path / f"x{suffix}")
    assert Image.open(tmp_path / f"x{suffix}").mode == mode
    out = _rgb(tmp_path / f"x{suffix}")
    assert (out == k[..., None]).all()


def test_exif_orientation_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red
    pixels[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left half ends on top
    Image.fromarray(pixels).save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = _rgb(tmp_path / "o.jpg")
    assert out.shape == (40, 20, 3)
    assert np.abs(out[2:18].mean((0, 1)) - (255, 0, 0)).max() < 20
    assert np.abs(out[22:38].mean((0, 1)) - (0, 0, 255)).max() < 20


def _raises_naming(path, why: str) -> None:
    with pytest.raises(ImageLoadError) as info:
        load_rgb(path)
    message = str(info.value)
    assert str(path) in message and why in message and "\n" not in message


def test_bad_files_fail_by_name(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    _raises_naming(tmp_path / "cut.jpg", "truncated or corrupt")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    _raises_naming(tmp_path / "cut.png", "truncated or corrupt")
    (tmp_path / "notes.png").write_text("not pixels")
    _raises_naming(tmp_path / "notes.png", "not an image")
    _raises_naming(tmp_path / "missing.jpg", "not found")
    _raises_naming(tmp_path, "is a folder")
    Image.fromarray(np.zeros((2, 2), np.float32), "F").save(tmp_path / "f.tif")
    _raises_naming(tmp_path / "f.tif", "mode F")
    assert isinstance(ImageLoadError("x"), ValueError)


def test_to_rgb_in_memory():
    image = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (1, 1), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_listing_is_sorted_recursive_and_skips_hidden(tmp_path):
    for name in ["b.JPG", "a.png", "sub/z.webp", "sub/deeper/y.tiff", ".hidden/h.png", "._a.png", "c.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    rel = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert rel == ["a.png", "b.JPG", "sub/deeper/y.tiff", "sub/z.webp"]
    assert [p.name for p in list_images(tmp_path, recursive=False)] == ["a.png", "b.JPG"]
    assert is_image_file("x.JPEG") and not is_image_file("x.txt") and not is_image_file("jpg")
    with pytest.raises(ValueError, match="image folder not found"):
        list_images(tmp_path / "nope")


def test_next_index_follows_the_highest_number_so_a_gap_is_never_overwritten(tmp_path):
    from core.images import next_index
    assert next_index(tmp_path) == 0
    for name in ("00000.png", "00002.png", "notes.png", "00007.jpg", "grid-0003.png"):
        (tmp_path / name).write_bytes(b"")
    assert next_index(tmp_path) == 3  # CompVis counted 4 files and overwrote 00002.png... at 3 files, now at 4
    assert next_index(tmp_path, "grid-*.png") == 4
    with pytest.raises(ValueError, match="no '\\*'"):
        next_index(tmp_path, "grid.png")


def test_grid_rows_are_labelled_with_their_text():
    """make_grid(labels=...): a white strip left of the rows, with dark text beside each labelled row
    only, the images themselves unchanged to the right of it."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    plain = make_grid(images, nrow=2)
    labelled = make_grid(images, nrow=2, labels=["a sks circle", "a circle", ""])
    strip = labelled.shape[1] - plain.shape[1]
    assert strip > 20 and labelled.shape[0] == plain.shape[0]
    np.testing.assert_array_equal(labelled[:, strip:], plain)
    ink = (labelled[:, :strip] < 128).any(axis=(1, 2))
    bands = [ink[2 + r * 34: 2 + r * 34 + 32].sum() for r in range(3)]
    assert bands[0] > 3 and bands[1] > 3 and bands[2] == 0  # the empty label writes nothing
    assert make_grid(images, nrow=2, labels=["a" * 200, "b", "c"]).shape[1] < labelled.shape[1] * 4
    with pytest.raises(ValueError, match="2 labels for 3 rows"):
        make_grid(images, nrow=2, labels=["x", "y"])
