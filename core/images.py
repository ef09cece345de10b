"""Images: loading and validation (the one place where files on disk become RGB images), and the
way out again (uint8 arrays, grids, PNG files that carry their settings).

Every dataset and script goes through :func:`load_rgb`, so a file decodes the same way for
DreamBooth training and for BLIP-2 captioning:

1. EXIF orientation is applied (``ImageOps.exif_transpose``), as phone cameras store it.
2. The whole file is decoded now, so a truncated or corrupt file fails here, by name.
3. The mode is brought to 8-bit RGB (:func:`to_rgb`): transparency (``RGBA``, ``LA``, ``PA``,
   or a ``transparency`` entry as palette/grey PNGs carry) is composited on WHITE, as
   transformers' ``convert_to_rgb`` does; 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I``)
   is scaled by 255/65535 with rounding instead of PIL's clipping conversion; grey, palette,
   CMYK and 1-bit images use PIL's conversion.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from core.weights import atomic_path

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


class ImageLoadError(ValueError):
    """A file that cannot be used as an image; the one-line message names it and says why."""


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the name ends in an image extension (case-insensitive); the content is not read."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under ``root`` by extension, sorted by their relative path (deterministic).

    Hidden files and folders (names starting with ``.``, e.g. macOS ``._x.jpg``) are skipped;
    symbolic links to folders are not followed.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: image folder not found")
    found = [p for p in visible_files(root, recursive) if is_image_file(p)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def visible_files(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Every file under ``root`` whose name and folders do not start with ``.`` (unsorted);
    symbolic links to folders are not followed."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        found += [Path(folder, f) for f in files if not f.startswith(".")]
    return found


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit grey (0..65535) -> 8-bit ``L``: round(v * 255 / 65535) = (v + 128) // 257."""
    v = np.asarray(image).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((v + 128) // 257).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit ``RGB``; transparency is composited on white (see the module notes)."""
    if image.mode in SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(image).convert("RGB")
    if image.mode == "F":
        raise ValueError("floating-point (mode F) images have no defined 8-bit range")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _open_decoded(path: Path) -> Image.Image:
    """Open and fully decode ``path``, orientation applied; errors name the file and the cause."""
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: image file not found") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image (PIL cannot identify the format)") from None
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"{path}: refused, too many pixels ({err})") from None
    except PermissionError:
        raise ImageLoadError(f"{path}: cannot read the file (permission denied)") from None
    except Exception as err:  # decoders raise OSError, SyntaxError, struct.error, zlib.error ...
        raise ImageLoadError(f"{path}: truncated or corrupt image ({type(err).__name__}: {err})") from None


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Read an image file as 8-bit RGB, EXIF-oriented, transparency composited on white.

    Raises :class:`ImageLoadError` (a ``ValueError``) naming the file when it is missing, not an
    image, truncated or corrupt, or of a mode without a defined 8-bit range.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageLoadError(f"{path}: is a folder, expected an image file")
    image = _open_decoded(path)
    try:
        return to_rgb(image)
    except ValueError as err:
        raise ImageLoadError(f"{path}: {err}") from None


def to_array(image: Image.Image) -> np.ndarray:
    """8-bit RGB -> (H, W, 3) float32 in [-1, 1], the CompVis data-set convention."""
    return np.asarray(image, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


# ---- images out -------------------------------------------------------------------------------
def image_digest(pixels: np.ndarray | torch.Tensor) -> str:
    """A digest of one image's shape, dtype and pixels (an array, or a tensor of any dtype on any
    device): equal keys mean equal pixels. Data sets key the uint8 pixels they convert, so keys of
    the same conversion mean equal model inputs; the header keeps keys of other dtypes, layouts and
    kinds (array or tensor) apart."""
    if isinstance(pixels, torch.Tensor):
        data = pixels.detach().cpu().contiguous()
        header = f"tensor{tuple(data.shape)}{data.dtype}".encode()
        body = data.reshape(-1).view(torch.uint8).numpy().tobytes()  # any dtype, bfloat16 included
    else:
        data = np.ascontiguousarray(pixels)
        header, body = f"array{data.shape}{data.dtype}".encode(), data.tobytes()
    return hashlib.blake2b(header + body, digest_size=16).hexdigest()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Decoded samples in [-1, 1], (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    x = ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return (rearrange(x, "b c h w -> b h w c").cpu().numpy() * 255.0).round().astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int, pad: int = 2, labels: Sequence[str] | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one image with ``nrow`` images per row, white padding between; ``labels``
    (one per row, e.g. the row's prompt) are written in black on a white strip left of their rows."""
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    if labels is not None and len(labels) != rows:
        raise ValueError(f"make_grid: {len(labels)} labels for {rows} rows")
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y:y + h, x:x + w] = img
    return canvas if labels is None else _label_rows(canvas, labels, h, pad)


MAX_LABEL = 60  # characters of a row label; longer ones end in "..."


def _label_rows(canvas: np.ndarray, labels: Sequence[str], h: int, pad: int) -> np.ndarray:
    texts = [t if len(t) <= MAX_LABEL else t[:MAX_LABEL - 3] + "..." for t in map(str, labels)]
    font = ImageFont.load_default(size=max(8, min(24, h // 3)))
    width = max(font.getbbox(t)[2] for t in texts) + 2 * pad + 4 if texts else 0
    strip = Image.new("RGB", (width, canvas.shape[0]), "white")
    draw = ImageDraw.Draw(strip)
    for r, text in enumerate(texts):
        draw.text((pad + 2, pad + r * (h + pad) + h // 2), text, fill="black", font=font, anchor="lm")
    return np.concatenate([np.asarray(strip, dtype=np.uint8), canvas], axis=1)


def save_png(image: np.ndarray, path: str | os.PathLike, info: Mapping[str, Any] | None = None) -> Path:
    """Write a PNG atomically; ``info`` goes into its text chunks (one per key, plus ``parameters`` as JSON)."""
    meta = PngInfo()
    for k, v in (info or {}).items():
        meta.add_text(str(k), str(v))
    if info:
        meta.add_text("parameters", json.dumps(dict(info), default=str))
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=meta)
    return path


def next_index(folder: str | os.PathLike, pattern: str = "*.png") -> int:
    """The index after the highest of a folder's numbered outputs (``pattern``: its ``*`` stands for the
    number), so that no file is overwritten when some are missing (CompVis counted the files)."""
    head, star, tail = pattern.partition("*")
    if not star:
        raise ValueError(f"next_index: pattern {pattern!r} has no '*' for the number")
    numbered = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
    found = [int(m.group(1)) for p in Path(folder).glob(pattern) if (m := numbered.fullmatch(p.name))]
    return max(found, default=-1) + 1
