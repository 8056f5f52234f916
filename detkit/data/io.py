"""Image reading: any common file -> UInt8[H,W,3] RGB, EXIF orientation applied.

OpenCV decodes (``IMREAD_UNCHANGED``, so 16-bit and alpha survive to be converted here instead
of OpenCV's implicit conversions). With ``IMREAD_UNCHANGED`` OpenCV does *not* apply the EXIF
orientation, so it is read from the file header with Pillow and applied here; the result equals
what ``cv2.imread(path, cv2.IMREAD_COLOR)`` shows for 8-bit images (and what photo viewers show).
Annotations are expected in that displayed (EXIF-applied) frame.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np

from ..errors import DatasetError

__all__ = ["DatasetError", "IMAGE_EXTENSIONS", "ImageReadError", "read_image", "read_mask", "image_size",
           "exif_orientation"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")   # what datasets list
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


class ImageReadError(DatasetError):
    """An image file is missing, unreadable, truncated or of an unsupported kind."""


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(f"image file not found: {path}") from None
    except OSError as e:
        raise ImageReadError(f"cannot read image file {path}: {e}") from None


def _check_complete(data: bytes, path: Path) -> None:
    """OpenCV decodes a truncated JPEG into a grey-filled image with only a log line: catch it here."""
    # The end-of-image marker cannot occur inside entropy-coded data, so its absence from the
    # tail means the file was cut off (trailing padding after it is tolerated).
    if data[:2] == _JPEG_SOI and _JPEG_EOI not in data[-1024:]:
        raise ImageReadError(f"truncated JPEG file (no end-of-image marker): {path}")
    if data[:8] == _PNG_SIG and b"IEND" not in data[-64:]:
        raise ImageReadError(f"truncated PNG file (no IEND chunk): {path}")


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1..8) of an encoded image, 1 when absent or unreadable."""
    # Fast paths: Pillow decodes a whole PNG to look for an eXIf chunk, so look for it first.
    if data[:8] == _PNG_SIG and b"eXIf" not in data:
        return 1
    if data[:2] == _JPEG_SOI and b"Exif\x00\x00" not in data[:65536]:
        return 1
    try:
        from PIL import Image
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                value = int(im.getexif().get(0x0112, 1))
    except Exception:   # not a format Pillow knows, or a broken EXIF block: nothing to rotate
        return 1
    return value if 1 <= value <= 8 else 1


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a stored [H,W,...] array into its displayed orientation (EXIF tag semantics)."""
    if orientation in (5, 6, 7, 8):
        image = np.swapaxes(image, 0, 1)   # transpose; then a flip gives the rotations
    flip_x = orientation in (2, 3, 6, 7)
    flip_y = orientation in (3, 4, 7, 8)
    if flip_x:
        image = image[:, ::-1]
    if flip_y:
        image = image[::-1]
    return np.ascontiguousarray(image)


def _to_uint8(image: np.ndarray, path: Path) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if image.dtype in (np.float32, np.float64, np.float16):
        return (np.clip(np.nan_to_num(image), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise ImageReadError(f"unsupported pixel type {image.dtype} in image {path}")


def _to_rgb(image: np.ndarray, path: Path) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:   # alpha is dropped, not composited: detection sees the stored colours
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise ImageReadError(f"unsupported number of channels ({channels}) in image {path}")


def read_image(path, *, exif: bool = True) -> np.ndarray:
    """Read an image file as UInt8[H,W,3] RGB with its EXIF orientation applied.

    Grayscale, palette, RGBA (alpha dropped) and 16-bit (scaled to 8-bit) images are converted.
    A missing, undecodable or truncated file raises ``ImageReadError`` naming the file.
    ``exif=False`` keeps the stored pixel order (for annotations made on the stored frame).
    """
    path = Path(path)
    data = _read_bytes(path)
    if not data:
        raise ImageReadError(f"empty image file: {path}")
    _check_complete(data, path)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:   # OpenCV asserts instead of returning None, e.g. above 2^30 pixels
        reason = "more pixels than OpenCV decodes (2^30; OPENCV_IO_MAX_IMAGE_PIXELS raises it)" \
            if "MAX_IMAGE_PIXELS" in str(e) else str(e).strip().splitlines()[-1]
        raise ImageReadError(f"cannot decode image file {path}: {reason}") from None
    if image is None or image.size == 0:
        raise ImageReadError(f"cannot decode image file (corrupt or unsupported format): {path}")
    image = _to_rgb(_to_uint8(image, path), path)
    return apply_orientation(image, exif_orientation(data)) if exif else np.ascontiguousarray(image)


def read_mask(path) -> np.ndarray:
    """Read a label PNG as UInt8[H,W] of class indices (palette indices for palette PNGs).

    Uses Pillow because OpenCV would expand a palette PNG (the VOC SegmentationClass format)
    into colours.
    """
    path = Path(path)
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I;16", "I"):
                raise ImageReadError(f"segmentation mask {path} has mode {im.mode}; expected a "
                                     f"single-channel or palette PNG of class indices")
            mask = np.array(im)
    except FileNotFoundError:
        raise ImageReadError(f"mask file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageReadError(f"cannot decode mask file {path}: {e}") from None
    if mask.dtype != np.uint8:
        if mask.max(initial=0) > 255:
            raise ImageReadError(f"mask {path} has values > 255; expected class indices")
        mask = mask.astype(np.uint8)
    return mask


def image_size(path) -> tuple[int, int]:
    """(H, W) of an image as ``read_image`` would return it, reading only the header when possible."""
    path = Path(path)
    try:
        from PIL import Image
        with Image.open(path) as im:
            w, h = im.size
            orientation = int(im.getexif().get(0x0112, 1))
        return (w, h) if orientation in (5, 6, 7, 8) else (h, w)
    except FileNotFoundError:
        raise ImageReadError(f"image file not found: {path}") from None
    except Exception:
        return tuple(read_image(path).shape[:2])
