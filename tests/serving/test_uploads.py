"""defectflow.serving.uploads: valid uploads decode to RGB, hostile ones are refused with the right status."""

from __future__ import annotations

import io
import random
import struct
import time

import numpy as np
import pytest
from helpers_uploads import (
    SAMPLES,
    bmp_with_size,
    cv2_encode,
    jpeg_with_size,
    pil_encode,
    png_with_size,
    rgb_image,
    tiff_with_size,
)
from PIL import Image

from defectflow.config import load_config
from defectflow.serving import uploads
from defectflow.serving.uploads import (
    UploadLimits,
    UploadRejected,
    check_declared_type,
    check_upload,
    decode_checked,
    decode_upload,
    sniff_format,
)

LIMITS = UploadLimits()
# Pillow warns about the corrupt files these tests make on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --- what is accepted ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_accepted_format_and_mode_decodes_to_rgb8(name):
    image = decode_upload(SAMPLES[name], LIMITS)
    assert image.dtype == np.uint8 and image.shape == (24, 32, 3)
    expected = rgb_image()
    if name.endswith("gray16"):
        gray = np.round(np.arange(24 * 32).reshape(24, 32) * 85 / 257).astype(np.uint8)
        expected = np.dstack([gray] * 3)
    elif name == "png-palette":  # what the palette holds, as Pillow reads it
        expected = np.asarray(Image.open(io.BytesIO(SAMPLES[name])).convert("RGB"))
    elif name.startswith(("jpeg-gray", "bmp-gray")):
        channel = 0 if name.startswith("jpeg") else 1
        expected = np.dstack([rgb_image()[:, :, channel]] * 3)
    tolerance = 4 if name.startswith("jpeg") else 0  # JPEG is lossy; the rest exact
    assert np.abs(image.astype(int) - expected.astype(int)).mean() <= tolerance, name


def test_every_16_bit_value_becomes_round_of_a_257th():
    gray16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    image = decode_upload(cv2_encode(".png", gray16), LIMITS)
    expected = np.round(gray16 / 257.0).astype(np.uint8)
    assert np.array_equal(image, np.dstack([expected] * 3))


@pytest.mark.parametrize(
    "content_type",
    [None, "", "image/png", "image/jpeg", "IMAGE/PNG; q=1", "application/octet-stream"],
)
def test_image_or_generic_declared_types_are_accepted_whatever_format_they_name(content_type):
    # Clients label files by their extension; the bytes decide the format.
    assert decode_upload(SAMPLES["png-rgb"], LIMITS, content_type).shape == (24, 32, 3)


def test_limits_come_from_the_serve_config():
    serve = load_config().serve
    limits = UploadLimits.from_config(serve)
    assert limits.max_bytes == serve.max_upload_bytes == 20_000_000
    assert limits.max_pixels == serve.max_pixels == 40_000_000
    assert limits.allowed_formats == ("png", "jpeg", "bmp", "tiff")
    assert UploadLimits(allowed_formats=("JPG", "tif")).allowed_formats == ("jpeg", "tiff")
    with pytest.raises(ValueError, match="allowed_formats"):
        UploadLimits(allowed_formats=("png", "gif"))
    with pytest.raises(ValueError, match="positive"):
        UploadLimits(max_bytes=0)


# --- what is refused, and how ----------------------------------------------------------------


def refusal(
    data: bytes, limits: UploadLimits = LIMITS, content_type: str | None = None
) -> UploadRejected:
    with pytest.raises(UploadRejected) as caught:
        decode_upload(data, limits, content_type)
    message = str(caught.value)
    assert message and "\n" not in message
    return caught.value


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"", 400, "empty file: expected a PNG, JPEG, BMP or TIFF image"),
        (b"this is not an image\n", 400, "not a decodable image"),
        (b"<html><body>hi</body></html>", 400, "not a decodable image"),
        (b"%PDF-1.7\n", 415, "PDF images are not accepted"),
        (
            pil_encode(Image.fromarray(rgb_image()), "GIF"),
            415,
            "GIF images are not accepted: send PNG, JPEG, BMP or TIFF",
        ),
        (pil_encode(Image.fromarray(rgb_image()), "WEBP"), 415, "WEBP images are not accepted"),
        (SAMPLES["png-rgb"][: len(SAMPLES["png-rgb"]) // 2], 400, "not a decodable image"),
        (SAMPLES["jpeg-rgb"][: len(SAMPLES["jpeg-rgb"]) // 2], 400, "not a decodable image"),
        (SAMPLES["bmp-rgb"][: len(SAMPLES["bmp-rgb"]) // 2], 400, "not a decodable image"),
        (SAMPLES["tiff-rgb"][: len(SAMPLES["tiff-rgb"]) // 2], 400, "not a decodable image"),
        (SAMPLES["png-rgb"][:8], 400, "not a decodable image"),
    ],
    ids=[
        "empty",
        "text",
        "html",
        "pdf",
        "gif",
        "webp",
        "truncated-png",
        "truncated-jpeg",
        "truncated-bmp",
        "truncated-tiff",
        "png-signature-only",
    ],
)
def test_bad_uploads_are_refused_with_a_clear_message(data, status, message):
    rejected = refusal(data)
    assert rejected.status_code == status
    assert message in str(rejected)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_truncation_is_400(name):
    # Every 7th cut, and every one of the last 16 (a TIFF cut there lost only its
    # next-directory offset, which libtiff forgave).
    data = SAMPLES[name]
    cuts = sorted({*range(1, len(data), 7), *range(max(1, len(data) - 16), len(data))})
    statuses = {cut: _status(data[:cut]) for cut in cuts}
    assert {cut: status for cut, status in statuses.items() if status != 400} == {}


def _status(data: bytes) -> int:
    try:
        decode_upload(data, LIMITS)
    except UploadRejected as exc:
        return exc.status_code
    return 200


def test_more_bytes_than_allowed_is_413_before_anything_else():
    rejected = refusal(SAMPLES["png-rgb"], UploadLimits(max_bytes=100))
    assert rejected.status_code == 413
    assert f"file of {len(SAMPLES['png-rgb'])} bytes exceeds the limit of 100 bytes" == str(
        rejected
    )


def test_a_format_left_out_of_allowed_formats_is_415():
    rejected = refusal(SAMPLES["jpeg-rgb"], UploadLimits(allowed_formats=("png",)))
    assert rejected.status_code == 415
    assert str(rejected) == "JPEG images are not accepted: send PNG"


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/json", "text/html; charset=utf-8", "multipart/form-data"],
)
def test_a_declared_non_image_type_is_415_even_for_image_bytes(content_type):
    rejected = refusal(SAMPLES["png-rgb"], content_type=content_type)
    assert rejected.status_code == 415
    assert "is not an image type" in str(rejected)
    with pytest.raises(UploadRejected):
        check_declared_type(content_type.encode())


def test_non_image_bytes_are_400_whatever_their_declared_type():
    rejected = refusal(b"this is not an image\n", content_type="text/plain")
    assert rejected.status_code == 400 and "not a decodable image" in str(rejected)


def test_magic_bytes_decide_the_format_not_names():
    assert [sniff_format(SAMPLES[n]) for n in ("png-rgb", "jpeg-rgb", "bmp-rgb", "tiff-rgb")] == [
        "png",
        "jpeg",
        "bmp",
        "tiff",
    ]
    assert sniff_format(b"RIFF\x00\x00\x00\x00WAVE") is None
    assert sniff_format(b"hello") is None


@pytest.fixture
def decoder_must_not_run(monkeypatch):
    """Refusals that must come from the header alone: reaching the decoder fails the test."""

    def decoder(data):
        raise AssertionError("decode_image was called: pixels would have been allocated")

    monkeypatch.setattr(uploads, "decode_image", decoder)


@pytest.mark.parametrize(
    "make",
    [png_with_size, jpeg_with_size, bmp_with_size, tiff_with_size],
    ids=["png", "jpeg", "bmp", "tiff"],
)
def test_decompression_bombs_are_refused_from_the_header_without_decoding(
    make, decoder_must_not_run
):
    width, height = (
        (60000, 60000) if make is jpeg_with_size else (100000, 100000)
    )  # JPEG sides are 16 bit
    data = make(width, height)
    assert len(data) < 2000  # a few kilobytes that would decode to ~30 GB
    start = time.perf_counter()
    rejected = refusal(data)
    assert time.perf_counter() - start < 0.5
    assert rejected.status_code == 413
    assert f"{width}x{height} pixels exceeds the limit of 40000000 pixels" in str(rejected)


def test_the_pixel_limit_is_the_configured_one(decoder_must_not_run):
    assert refusal(png_with_size(101, 100), UploadLimits(max_pixels=100 * 100)).status_code == 413


def test_check_upload_gives_the_pixel_count_without_decoding(decoder_must_not_run):
    # What a server budgets memory on: 40 M pixels declared by a 2 kB file, no pixel decoded.
    checked = check_upload(png_with_size(8000, 5000), LIMITS)
    assert (checked.format, checked.width, checked.height, checked.pixels) == (
        "png",
        8000,
        5000,
        40_000_000,
    )
    for name in ("jpeg-rgb", "bmp-rgb", "tiff-rgb"):
        assert check_upload(SAMPLES[name], LIMITS).pixels == 24 * 32


def test_decode_checked_is_the_rest_of_decode_upload():
    checked = check_upload(SAMPLES["png-rgb"], LIMITS)
    assert np.array_equal(
        decode_checked(checked, LIMITS), decode_upload(SAMPLES["png-rgb"], LIMITS)
    )
    with pytest.raises(UploadRejected) as refused:  # a header that passes, pixel data that does not
        decode_checked(check_upload(png_with_size(400, 300), LIMITS), LIMITS)
    assert refused.value.status_code == 400


def test_the_header_checked_bomb_is_below_the_limit_when_small():
    # The same crafted header at a small size passes the header checks and reaches the
    # decoder, which finds too little pixel data: proves the refusals above are about size.
    assert refusal(png_with_size(400, 300)).status_code == 400


def test_the_configured_limit_governs_not_pillows_own(monkeypatch):
    # 400 M pixels: above Pillow's fixed bomb limit (179 M), within a configured 10**12.
    monkeypatch.setattr(uploads, "decode_image", lambda data: np.zeros((2, 2, 3), np.uint8))
    assert decode_upload(png_with_size(20000, 20000), UploadLimits(max_pixels=10**12)).shape == (
        2,
        2,
        3,
    )
    assert refusal(png_with_size(20000, 20000), UploadLimits(max_pixels=10**8)).status_code == 413


def test_a_png_chunk_longer_than_the_file_is_refused_before_decoding(decoder_must_not_run):
    # OpenCV allocates what a chunk length claims: this 2 kB file cost it 4 GB of memory.
    data = bytearray(SAMPLES["png-rgb"])
    idat = data.find(b"IDAT") - 4
    data[idat : idat + 4] = struct.pack(">I", 0xFF0004D9)
    data[idat + 8 : idat + 12] = b"\x00\x00\x00\x00"
    rejected = refusal(bytes(data))
    assert rejected.status_code == 400
    assert "truncated or corrupt PNG" in str(rejected)


def _frames(image_format: str) -> bytes:
    first, second = Image.fromarray(rgb_image()), Image.fromarray(255 - rgb_image())
    return pil_encode(first, image_format, save_all=True, append_images=[second])


@pytest.mark.parametrize(
    ("image_format", "name"),
    [("PNG", "PNG"), ("TIFF", "TIFF"), ("MPO", "JPEG")],
    ids=["apng", "multipage-tiff", "mpo"],
)
def test_animated_and_multi_page_images_are_refused(image_format, name, decoder_must_not_run):
    rejected = refusal(_frames(image_format))
    assert rejected.status_code == 415
    assert f"multi-frame {name} images (animated or multi-page) are not accepted" in str(rejected)


def test_single_frame_files_written_the_same_way_are_accepted():
    image = Image.fromarray(rgb_image())
    for image_format in ("PNG", "TIFF"):
        assert decode_upload(pil_encode(image, image_format, save_all=True), LIMITS).shape == (
            24,
            32,
            3,
        )


def test_pixel_types_the_model_cannot_take_are_400():
    int32 = pil_encode(Image.fromarray(np.arange(24 * 32, dtype=np.int32).reshape(24, 32)), "TIFF")
    rejected = refusal(int32)
    assert rejected.status_code == 400


def _mutations(count: int, seed: int):
    """Seeded truncations, byte flips, header stomps, splices and big length fields."""
    rng = random.Random(seed)
    names = sorted(SAMPLES)
    for _ in range(count):
        data = bytearray(SAMPLES[rng.choice(names)])
        kind = rng.randrange(5)
        if kind == 0:
            data = data[: rng.randrange(len(data))]
        elif kind == 1:
            for _ in range(rng.randint(1, 16)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 2:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(min(len(data), 128))] = rng.choice(
                    [0x00, 0x01, 0x7F, 0x80, 0xFF]
                )
        elif kind == 3:
            start = rng.randrange(len(data))
            data[start : start + rng.randint(1, 64)] = rng.randbytes(rng.randint(0, 64))
        else:
            at = rng.randrange(len(data) - 4)
            data[at : at + 4] = struct.pack(
                "<I", rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 0x10000000, rng.randrange(2**32)])
            )
        yield bytes(data)


def test_fuzzed_uploads_never_raise_anything_but_upload_rejected():
    outcomes: dict[object, int] = {}
    start = time.perf_counter()
    for data in _mutations(600, seed=20261123):
        try:
            image = decode_upload(data, LIMITS)
        except UploadRejected as exc:
            assert 400 <= exc.status_code < 500 and str(exc)
            outcomes[exc.status_code] = outcomes.get(exc.status_code, 0) + 1
        else:  # mutations that leave a decodable image are fine, and must decode properly
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            outcomes["decoded"] = outcomes.get("decoded", 0) + 1
    elapsed = time.perf_counter() - start
    print(f"\n600 mutated uploads in {elapsed:.1f} s: {outcomes}")
    assert outcomes.get(400, 0) > 100 and outcomes.get("decoded", 0) > 50  # both paths exercised
    assert elapsed < 60
