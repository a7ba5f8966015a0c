"""Turn what a user hands the predictor (paths, PIL images, numpy arrays) into 8-bit RGB PIL images.

What is converted, and how (docs/INFERENCE.md repeats this for users):

- grayscale (``L``, ``1``), palette (``P``) and CMYK images become RGB;
- transparency (``RGBA``, ``LA``, ``P`` with a transparent colour) is composited onto white;
- 16-bit and 32-bit integer images (``I;16``, ``I``) and float images (``F``) are scaled linearly from
  their type's full range (0..65535 for 16-bit, 0..1 for floats) to 0..255;
- the EXIF orientation of a photo is applied, so masks line up with the picture as a viewer shows it;
- an image whose longer side exceeds ``max_side`` (default ``MAX_IMAGE_SIDE`` = 4096 px) is shrunk,
  aspect kept, to that side; its masks are then returned at the shrunk size, which the prediction
  records in ``image_sizes``. Images above Pillow's decompression-bomb limit are refused.

Every failure is a PrimaError that names the image (1-based, as in answers) and its file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from prima.errors import PrimaError

MAX_IMAGE_SIDE = 4096  # longer side above this is shrunk; keeps masks and overlays of huge scans in memory
ImageInput = str | os.PathLike | Image.Image | np.ndarray


@dataclass
class LoadedImage:
    """An image ready for the model, with where it came from (for messages and output file names)."""

    image: Image.Image  # 8-bit RGB
    source: str  # file path, or "<PIL image>" / "<array>"
    original_size: tuple[int, int]  # (height, width) before any shrinking

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image the model sees and the masks have."""
        return self.image.height, self.image.width


def load_image(source: ImageInput, index: int = 1, *, max_side: int = MAX_IMAGE_SIDE) -> LoadedImage:
    """Load image ``index`` (1-based, for messages) from a path, PIL image or array, as 8-bit RGB."""
    if isinstance(source, (str, os.PathLike)):
        image, name = _open_file(Path(source), index), str(source)
    elif isinstance(source, Image.Image):
        image, name = source, "<PIL image>"
        try:
            image.load()  # a lazily opened PIL image of a truncated file fails here, not in the model
        except (OSError, SyntaxError, ValueError) as e:
            raise PrimaError(f"image {index} ({name}): truncated or corrupt image data ({e})") from None
    elif isinstance(source, np.ndarray):
        image, name = _from_array(source, index), "<array>"
    else:
        raise PrimaError(
            f"image {index}: expected a file path, a PIL image or a numpy array, got {type(source).__name__}"
        )
    original = (image.height, image.width)
    if image.width < 1 or image.height < 1:
        raise PrimaError(f"image {index} ({name}) is empty ({image.width}x{image.height} pixels)")
    rgb = to_rgb(image)
    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        new_size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(new_size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return LoadedImage(rgb, name, original)


def load_images(sources: Any, *, max_images: int, max_side: int = MAX_IMAGE_SIDE) -> list[LoadedImage]:
    """Load 1..``max_images`` images, refusing none, too many, or a single image not in a list."""
    if isinstance(sources, (str, os.PathLike, Image.Image, np.ndarray)):
        sources = [sources]  # one image given bare: accept it, it is unambiguous
    sources = list(sources or [])
    if not sources:
        raise PrimaError(f"no image given: pass 1 to {max_images} images")
    if len(sources) > max_images:
        raise PrimaError(f"{len(sources)} images given, but this model takes at most {max_images}")
    return [load_image(s, i, max_side=max_side) for i, s in enumerate(sources, start=1)]


def _open_file(path: Path, index: int) -> Image.Image:
    where = f"image {index} ({path})"
    if not path.exists():
        raise PrimaError(f"{where}: file not found")
    if path.is_dir():
        raise PrimaError(f"{where}: is a folder, not an image file")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here and not inside the model
            return ImageOps.exif_transpose(im)
    except Image.DecompressionBombError as e:
        raise PrimaError(f"{where}: too large to decode safely ({e}); shrink it first") from None
    except UnidentifiedImageError:
        raise PrimaError(f"{where}: not an image file Pillow can read") from None
    except PermissionError:
        raise PrimaError(f"{where}: permission denied") from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow reports truncated/corrupt data as OSError
        raise PrimaError(f"{where}: truncated or corrupt image data ({e})") from None


def _from_array(array: np.ndarray, index: int) -> Image.Image:
    a = array
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise PrimaError(f"image {index}: an array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise PrimaError(f"image {index}: the float array holds NaN or infinite values")
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)  # floats are taken as 0..1
    elif np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8:
        a = _scale_to_uint8(a, np.iinfo(a.dtype).max if a.dtype.itemsize <= 2 else 65535)
    elif a.dtype != np.uint8:
        raise PrimaError(f"image {index}: unsupported array type {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a))


def _scale_to_uint8(a: np.ndarray, full_scale: int) -> np.ndarray:
    """Integer data of range 0..full_scale to 0..255 (values outside are clipped)."""
    scaled = np.clip(a.astype(np.float64), 0, full_scale) * (255.0 / full_scale)
    return (scaled + 0.5).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparency composited onto white (see the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(image)
        full = 65535 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255
        return Image.fromarray(_scale_to_uint8(a, full)).convert("RGB")
    if mode == "F":
        a = np.asarray(image, dtype=np.float32)
        a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
        return Image.fromarray((np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in image.info or mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")
