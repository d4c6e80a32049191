"""Untrusted image uploads to RGB arrays, or a refusal that says why (no HTTP here).

`decode_upload` checks, cheapest first, and decodes only what passed every check. The checks
alone are `check_upload` (steps 1 to 5), whose `CheckedUpload` says how many pixels the image
will decode to before any is decoded (a server budgets memory on it), then `decode_checked`
(step 6):

1. size in bytes: empty (400) or more than `max_bytes` (413);
2. the real format, sniffed from the magic bytes (never from a file name or a declared
   type): not an image format at all (400), an image format that is not allowed, e.g. GIF
   or WebP (415);
3. the declared content type, when the caller knows one (a multipart part's
   Content-Type), checked after the bytes: `image/*`, `application/octet-stream` or none
   are accepted whatever image format they name, because clients label files by extension
   and the bytes decide anyway; a non-image type (`text/plain`, `application/json`, ...)
   on image bytes is refused (415): the upload contradicts itself. (Non-image bytes were
   already refused as such, 400, whatever their declared type: that is the useful answer
   to a text file sent as text/plain.);
4. width x height read from the header by Pillow, which opens lazily and decodes no pixel:
   more than `max_pixels` is refused (413) before anything is allocated (decompression
   bombs: a 100000 x 100000 PNG is a few kilobytes). A PNG chunk claiming more bytes than
   the file has is refused (400) here too (OpenCV would allocate what it claims), and so
   are a TIFF whose first directory does not fit in the file (libtiff decodes some of
   those) and PNG/JPEG headers of thousands of empty chunks (seconds of parsing each);
5. animated or multi-page images (APNG, multi-page TIFF, MPO) are refused (415): the model
   reads one frame and would silently ignore the others;
6. decoding through `defectflow.inference.preprocessing.decode_image`, the one decode path of
   training, evaluation and serving; bytes it cannot decode are refused (400).

Every failure is an `UploadRejected` carrying the HTTP status a server should answer.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from defectflow.inference.preprocessing import InvalidImageError, decode_image

#: Formats decode_image reads, by the name configs use, with Pillow's name for each.
SUPPORTED_FORMATS = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF"}
_FORMAT_ALIASES = {"jpg": "jpeg", "tif": "tiff"}

#: (offset, magic bytes, format). Formats not in SUPPORTED_FORMATS are recognised only to
#: answer "not allowed" (415) instead of "not an image" (400).
_SIGNATURES = (
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"\xff\xd8\xff", "jpeg"),
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
    (0, b"II+\x00", "tiff"),  # BigTIFF
    (0, b"MM\x00+", "tiff"),
    (0, b"BM", "bmp"),
    (0, b"GIF87a", "gif"),
    (0, b"GIF89a", "gif"),
    (8, b"WEBP", "webp"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
    (0, b"\xff\x4f\xff\x51", "jpeg2000"),
    (4, b"ftypavif", "avif"),
    (4, b"ftypheic", "heic"),
    (4, b"ftypmif1", "heif"),
    (0, b"8BPS", "psd"),
    (0, b"%PDF-", "pdf"),
)
_GENERIC_CONTENT_TYPES = {"", "application/octet-stream"}
#: PNG chunks before the pixel data / JPEG segments before the first scan, at most.
_MAX_HEADER_SEGMENTS = 1000
#: PNG chunks in all, at most (a 20 MB file in libpng's 8 kB IDAT chunks has 2,500).
_MAX_PNG_CHUNKS = 100_000


class UploadRejected(ValueError):
    """An upload the service refuses; `status_code` is the HTTP status to answer with."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class UploadLimits:
    """What one uploaded image may be (see `ServeConfig` for the configured values)."""

    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    allowed_formats: tuple[str, ...] = ("png", "jpeg", "bmp", "tiff")

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(
                f"upload limits must be positive, got max_bytes={self.max_bytes}, "
                f"max_pixels={self.max_pixels}"
            )
        formats = tuple(
            dict.fromkeys(_FORMAT_ALIASES.get(f.lower(), f.lower()) for f in self.allowed_formats)
        )
        unknown = [f for f in formats if f not in SUPPORTED_FORMATS]
        if unknown or not formats:
            raise ValueError(
                f"allowed_formats must be some of {', '.join(SUPPORTED_FORMATS)}, "
                f"got {list(self.allowed_formats)}"
            )
        object.__setattr__(self, "allowed_formats", formats)

    @classmethod
    def from_config(cls, serve_cfg) -> UploadLimits:
        """From the `serve` section of a config (a DictConfig or a `ServeConfig`)."""
        return cls(
            max_bytes=int(serve_cfg.max_upload_bytes),
            max_pixels=int(serve_cfg.max_pixels),
            allowed_formats=tuple(str(f) for f in serve_cfg.allowed_formats),
        )

    def describe_formats(self) -> str:
        """E.g. "PNG, JPEG, BMP or TIFF"."""
        names = [f.upper() for f in self.allowed_formats]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def sniff_format(data: bytes) -> str | None:
    """The image format the bytes are, from their magic number (None: not one we know)."""
    for offset, magic, name in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            if name == "webp" and data[:4] != b"RIFF":
                continue
            return name
    return None


def check_declared_type(content_type: str | bytes | None) -> None:
    """Refuse (415) a declared non-image type; image/*, application/octet-stream and none
    pass whatever format they name (the bytes decide which format it is)."""
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared not in _GENERIC_CONTENT_TYPES and not declared.startswith("image/"):
        raise UploadRejected(
            415,
            f"declared content type {declared[:60]!r} is not an image type: send the file "
            "as image/* or application/octet-stream",
        )


@dataclass(frozen=True)
class CheckedUpload:
    """Upload bytes that passed every check but decoding, with the size their header declares."""

    data: bytes
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        """Width x height from the header: the pixels decoding will produce."""
        return self.width * self.height


def decode_upload(data: bytes, limits: UploadLimits, content_type: str | None = None) -> np.ndarray:
    """Untrusted upload bytes to RGB uint8 (H, W, 3), or UploadRejected (never another error
    for malformed bytes). `content_type` is the type the client declared, if any."""
    return decode_checked(check_upload(data, limits, content_type), limits)


def check_upload(
    data: bytes, limits: UploadLimits, content_type: str | None = None
) -> CheckedUpload:
    """Every check of `decode_upload` but decoding (no pixel is decoded): the upload with its
    header's width and height, or UploadRejected."""
    if not data:
        raise UploadRejected(400, f"empty file: expected a {limits.describe_formats()} image")
    if len(data) > limits.max_bytes:
        raise UploadRejected(
            413, f"file of {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes"
        )
    image_format = sniff_format(data)
    if image_format is None:
        raise UploadRejected(
            400, f"not a decodable image: the bytes are not a {limits.describe_formats()} file"
        )
    if image_format not in limits.allowed_formats:
        raise UploadRejected(
            415, f"{image_format.upper()} images are not accepted: send {limits.describe_formats()}"
        )
    check_declared_type(content_type)
    width, height = _check_header(data, image_format, limits)
    return CheckedUpload(data, image_format, width, height)


def decode_checked(upload: CheckedUpload, limits: UploadLimits) -> np.ndarray:
    """A `check_upload` result decoded to RGB uint8 (H, W, 3), or UploadRejected."""
    data, image_format = upload.data, upload.format
    try:
        image = decode_image(data)
    except InvalidImageError as exc:
        if str(exc).startswith("not a decodable image"):  # the decoder gave up on the bytes
            raise UploadRejected(
                400, f"not a decodable image: corrupt or truncated {image_format.upper()} data"
            ) from exc
        raise UploadRejected(400, f"unsupported {image_format.upper()} image: {exc}") from exc
    except cv2.error as exc:  # OpenCV 5 returns None on bad data; this is for what it still raises
        raise UploadRejected(
            400, f"not a decodable image: corrupt {image_format.upper()} data"
        ) from exc
    if image.shape[0] * image.shape[1] > limits.max_pixels:  # the decoder disagreed with the header
        raise UploadRejected(
            413,
            f"image of {image.shape[1]}x{image.shape[0]} pixels exceeds the limit of "
            f"{limits.max_pixels} pixels",
        )
    return image


def _check_png_chunks(data: bytes) -> None:
    """Every chunk length must fit in the file: OpenCV's PNG reader allocates what a chunk
    length says before reading it (a 2 kB file claiming a 4 GB chunk cost 4 GB of memory).
    And the chunks must be few: Pillow reads every one before the first IDAT (20 MB of empty
    chunks took it 3 s, OpenCV 2 s more); real files have tens before IDAT and, with 8 kB
    IDAT chunks, a few thousand in all."""
    position, chunks, before_pixels = 8, 0, True
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        if position + 12 + length > len(data):
            raise UploadRejected(
                400,
                f"not a decodable image: truncated or corrupt PNG (chunk {kind!r} at byte "
                f"{position} claims {length} bytes, the file has {len(data) - position - 12} left)",
            )
        if kind == b"IEND":
            return
        chunks += 1
        before_pixels = before_pixels and kind != b"IDAT"
        if chunks > (_MAX_HEADER_SEGMENTS if before_pixels else _MAX_PNG_CHUNKS):
            raise UploadRejected(
                400,
                f"not a decodable image: PNG with more than {chunks - 1} chunks "
                f"{'before its pixel data' if before_pixels else 'in all'}",
            )
        position += 12 + length


def _check_jpeg_segments(data: bytes) -> None:
    """Few marker segments before the first scan: Pillow reads each of them (20 MB of empty
    comment segments took it 4 s); real files have tens. Anything else is left to Pillow
    and libjpeg, which judge the structure."""
    position = 2
    for _ in range(_MAX_HEADER_SEGMENTS):
        if position + 4 > len(data) or data[position] != 0xFF:
            return
        marker = data[position + 1]
        if marker == 0xDA:  # start of scan: the header is over
            return
        if (
            marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01
        ):  # fill byte, markers without length
            position += 1 if marker == 0xFF else 2
        else:
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    raise UploadRejected(
        400,
        f"not a decodable image: JPEG with more than {_MAX_HEADER_SEGMENTS} segments "
        "before its image data",
    )


def _check_tiff_directory(data: bytes) -> None:
    """The first image directory must lie inside the file: libtiff decodes a file cut inside
    it (e.g. without its next-directory offset), so truncation would go unnoticed."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 64-bit offsets and counts, 20-byte entries
    offset_format, count_format, entry_size = ("Q", "Q", 20) if big else ("I", "H", 12)
    header_size = 16 if big else 8
    if len(data) < header_size:
        raise UploadRejected(400, "not a decodable image: truncated TIFF header")
    offset = struct.unpack_from(order + offset_format, data, 8 if big else 4)[0]
    count_size = struct.calcsize(count_format)
    if offset + count_size <= len(data):
        entries = struct.unpack_from(order + count_format, data, offset)[0]
        if offset + count_size + entries * entry_size + struct.calcsize(offset_format) <= len(data):
            return
    raise UploadRejected(
        400,
        f"not a decodable image: truncated or corrupt TIFF (its first directory, at byte "
        f"{offset}, ends past the {len(data)}-byte file)",
    )


def _open_header(data: bytes, image_format: str) -> Image.Image:
    """The sniffed format's Pillow plugin, reading the header only (Pillow opens lazily).

    What `Image.open(fp, formats=[...])` does, minus Pillow's own decompression-bomb check:
    the configured max_pixels decides alone (Pillow's fixed 89 M warning and 179 M error
    would overrule a larger configured limit, and warn on every upload above 89 M). Only the
    sniffed format's parser ever sees the bytes.
    """
    Image.init()
    factory, _ = Image.OPEN[SUPPORTED_FORMATS[image_format]]
    return factory(io.BytesIO(data), None)


def _check_header(data: bytes, image_format: str, limits: UploadLimits) -> tuple[int, int]:
    """Width and height from the header, refusing bombs and multi-frame images; no pixel is decoded."""
    name = image_format.upper()
    if image_format == "png":
        _check_png_chunks(data)
    elif image_format == "jpeg":
        _check_jpeg_segments(data)
    elif image_format == "tiff":
        _check_tiff_directory(data)
    try:
        with _open_header(data, image_format) as header:
            width, height = header.size
            # Only within the limit: a bomb is refused anyway. For a TIFF, is_animated reads
            # one more directory at most (is there a second page?), never all of them.
            animated = width * height <= limits.max_pixels and bool(
                getattr(header, "is_animated", False)
            )
    except Image.DecompressionBombError as exc:  # not raised by _open_header; kept as a backstop
        raise UploadRejected(
            413, f"image exceeds the limit of {limits.max_pixels} pixels ({exc})"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - hostile bytes reach Pillow's parsers: any error is the file's
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UploadRejected(
            400, f"not a decodable image: corrupt {name} header ({detail})"
        ) from exc
    if width < 1 or height < 1:
        raise UploadRejected(
            400, f"not a decodable image: {name} header gives {width}x{height} pixels"
        )
    if width * height > limits.max_pixels:
        raise UploadRejected(
            413, f"image of {width}x{height} pixels exceeds the limit of {limits.max_pixels} pixels"
        )
    if animated:
        raise UploadRejected(
            415,
            f"multi-frame {name} images (animated or multi-page) are not accepted: "
            "send a single image",
        )
    return width, height
