"""Crafted image uploads shared by the upload, inbox, review and hostile-traffic tests: every
accepted format and mode, and headers that claim any size (decompression bombs) cheaply."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
from PIL import Image


def rgb_image(height: int = 24, width: int = 32) -> np.ndarray:
    """Distinct values per channel, so a swapped channel order cannot pass."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 8) % 256, (y * 10) % 256, np.full_like(x, 200)], axis=-1).astype(np.uint8)


def cv2_encode(extension: str, array: np.ndarray) -> bytes:
    """RGB(A) or gray to file bytes; OpenCV wants BGR(A)."""
    if array.ndim == 3:
        code = cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
        array = cv2.cvtColor(array, code)
    ok, buffer = cv2.imencode(extension, array)
    assert ok
    return buffer.tobytes()


def pil_encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_with_size(width: int, height: int) -> bytes:
    """A well-formed PNG header claiming width x height, with a few bytes of pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def jpeg_with_size(width: int, height: int) -> bytes:
    data = bytearray(cv2_encode(".jpg", rgb_image(16, 16)))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_with_size(width: int, height: int) -> bytes:
    data = bytearray(cv2_encode(".bmp", rgb_image(4, 4)))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def tiff_with_size(width: int, height: int) -> bytes:
    """A minimal baseline TIFF (8-bit gray, one strip) whose header claims width x height."""
    entries = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 8 + 2 + 12 * 9 + 4),
        (277, 3, 1),
        (278, 4, height),
        (279, 4, 16),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value_field = (
            struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        )  # SHORT | LONG
        ifd += struct.pack("<HHI", tag, kind, 1) + value_field
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x00" * 16


def encoded_samples() -> dict[str, bytes]:
    """Real files of every accepted format and mode (the hostile server test mutates these)."""
    rgb = rgb_image()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    gray16 = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 85).astype(np.uint16)
    rgb16 = rgb.astype(np.uint16) * 257
    return {
        "png-rgb": cv2_encode(".png", rgb),
        "png-rgba": cv2_encode(".png", rgba),
        "png-gray16": cv2_encode(".png", gray16),
        "png-rgb16": cv2_encode(".png", rgb16),
        "png-palette": pil_encode(Image.fromarray(rgb).convert("P"), "PNG"),
        "jpeg-rgb": cv2_encode(".jpg", rgb),
        "jpeg-gray": cv2_encode(".jpg", rgb[:, :, 0]),
        "jpeg-progressive": pil_encode(Image.fromarray(rgb), "JPEG", progressive=True),
        "bmp-rgb": cv2_encode(".bmp", rgb),
        "bmp-gray": cv2_encode(".bmp", rgb[:, :, 1]),
        "tiff-rgb": cv2_encode(".tiff", rgb),
        "tiff-rgba": cv2_encode(".tiff", rgba),
        "tiff-gray16": cv2_encode(".tiff", gray16),
        "tiff-rgb16": cv2_encode(".tiff", rgb16),
        "tiff-lzw": pil_encode(Image.fromarray(rgb), "TIFF", compression="tiff_lzw"),
    }


SAMPLES = encoded_samples()
