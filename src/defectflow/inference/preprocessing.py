"""The one preprocessing path, shared by training, evaluation and serving: bytes, files and
arrays to model input.

Everything that turns a file or an upload into model input lives here (its answer side is
`defectflow.inference.postprocessing`), so a model is never fed differently in production than
it was in training. Pixel normalisation is part of the model itself: inputs here are RGB values
in [0, 255].
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

#: Decoding a huge upload would exhaust memory; real inspection images are far smaller.
MAX_PIXELS = 64_000_000


#: round(x / 257) for every 16-bit value, as a table: the float64 way took 5.8 s and 2.9 GB
#: for a 40 M pixel RGBA image (a 322 kB PNG upload); the table, 0.2 s and no copy.
_UINT16_TO_UINT8 = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)


class InvalidImageError(ValueError):
    """Bytes that are not a decodable image of a supported kind."""


def decode_image(data: bytes) -> np.ndarray:
    """PNG, JPEG, BMP or TIFF bytes (gray, RGB, RGBA; 8 or 16 bit) to RGB uint8 (H, W, 3)."""
    if not data:
        raise InvalidImageError("empty file: expected a PNG, JPEG, BMP or TIFF image")
    buffer = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InvalidImageError("not a decodable image: expected a PNG, JPEG, BMP or TIFF file")
    return to_rgb8(image, channel_order="bgr")


def to_rgb8(image: np.ndarray, channel_order: str = "rgb") -> np.ndarray:
    """Any 2-D or 3-D gray/colour/alpha array of uint8/uint16/float to RGB uint8."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise InvalidImageError(f"unsupported image shape {image.shape}")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise InvalidImageError(
            f"image of {image.shape[1]}x{image.shape[0]} pixels exceeds the limit of {MAX_PIXELS}"
        )
    if image.dtype == np.uint16:
        image = _UINT16_TO_UINT8[image]
    elif image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating):
            raise InvalidImageError(f"unsupported pixel type {image.dtype}")
        image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        code = cv2.COLOR_BGRA2RGB if channel_order == "bgr" else cv2.COLOR_RGBA2RGB
        return cv2.cvtColor(image, code)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if channel_order == "bgr" else image


def read_image(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        return decode_image(path.read_bytes())
    except InvalidImageError as exc:
        raise InvalidImageError(f"{path}: {exc}") from exc


def read_mask(path: str | Path) -> np.ndarray:
    """A ground-truth mask as uint8 {0, 1} (H, W): any non-zero pixel is defect."""
    mask = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise InvalidImageError(f"{path}: not a decodable mask image")
    return (mask > 0).astype(np.uint8)


def prepare_image(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) to the model's input: float32 (size, size, 3) in [0, 255]."""
    interpolation = cv2.INTER_AREA if min(image.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation).astype(np.float32)


def prepare_mask(mask: np.ndarray | None, size: int) -> np.ndarray:
    """Binary mask to a soft training target (size, size, 1): the defect fraction of each cell.

    Area averaging (not nearest neighbour) keeps defects smaller than a cell visible.
    """
    if mask is None:
        return np.zeros((size, size, 1), np.float32)
    resized = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return np.clip(resized, 0.0, 1.0)[:, :, None]
