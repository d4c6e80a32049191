import base64

import cv2
import numpy as np
import pytest

from defectflow.artifacts import DecisionPolicy
from defectflow.inference.postprocessing import encode_png, overlay, postprocess
from defectflow.inference.preprocessing import (
    InvalidImageError,
    decode_image,
    prepare_image,
    prepare_mask,
    read_image,
    read_mask,
    to_rgb8,
)

CLASSES = ["good", "crack", "poke"]


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def test_decode_colour_png_is_rgb():
    bgr = np.zeros((10, 12, 3), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV's order
    rgb = decode_image(_png(bgr))
    assert rgb.shape == (10, 12, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 200]


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff"])
def test_decode_formats(ext):
    ok, buf = cv2.imencode(ext, np.full((16, 16, 3), 90, np.uint8))
    assert ok
    assert decode_image(buf.tobytes()).shape == (16, 16, 3)


def test_decode_gray_16bit_and_rgba():
    gray16 = np.full((8, 9), 65535, np.uint16)
    out = decode_image(_png(gray16))
    assert out.shape == (8, 9, 3) and out.dtype == np.uint8 and out.max() == 255
    bgra = np.zeros((5, 5, 4), np.uint8)
    bgra[..., 2] = 255
    assert decode_image(_png(bgra))[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    "data", [b"", b"hello, not an image", _png(np.zeros((4, 4), np.uint8))[:20]]
)
def test_decode_rejects_non_images(data):
    with pytest.raises(InvalidImageError):
        decode_image(data)


def test_to_rgb8_rejects_odd_shapes_and_types():
    with pytest.raises(InvalidImageError, match="shape"):
        to_rgb8(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(InvalidImageError, match="pixel type"):
        to_rgb8(np.zeros((4, 4), np.int64))
    assert to_rgb8(np.ones((3, 3, 1), np.float32)).max() == 255


def test_read_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    with pytest.raises(InvalidImageError, match="bad.png"):
        read_image(bad)


def test_read_mask_is_binary(tmp_path):
    mask = np.zeros((6, 6), np.uint8)
    mask[2:4, 2:4] = 255
    path = tmp_path / "m.png"
    cv2.imwrite(str(path), mask)
    out = read_mask(path)
    assert set(np.unique(out)) == {0, 1} and out.sum() == 4


def test_prepare_image_and_soft_mask():
    image = np.zeros((64, 48, 3), np.uint8)
    x = prepare_image(image, 32)
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    mask = np.zeros((64, 64), np.uint8)
    mask[0, 0] = 1  # a one-pixel defect must survive downscaling
    soft = prepare_mask(mask, 16)
    assert soft.shape == (16, 16, 1) and soft.max() > 0
    assert prepare_mask(None, 8).sum() == 0


def test_postprocess_mask_at_input_resolution():
    soft = np.zeros((8, 8, 1), np.float32)
    soft[2:6, 2:6] = 0.9
    pred = postprocess(np.array([0.1, 0.7, 0.2]), soft, (40, 30), DecisionPolicy(CLASSES, 0.5))
    assert pred.label == "crack" and pred.is_defective
    assert pred.mask.shape == (40, 30) and 0 < pred.defect_area_fraction < 1
    body = pred.to_json()
    png = cv2.imdecode(
        np.frombuffer(base64.b64decode(body["mask_png_base64"]), np.uint8), cv2.IMREAD_UNCHANGED
    )
    assert png.shape == (40, 30) and set(np.unique(png)) <= {0, 255}
    assert body["mask_size"] == [30, 40]
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-6


def test_postprocess_good_clears_mask():
    soft = np.ones((8, 8, 1), np.float32)
    pred = postprocess(np.array([0.8, 0.1, 0.1]), soft, (8, 8), DecisionPolicy(CLASSES, 0.5))
    assert pred.label == "good" and not pred.is_defective
    assert pred.mask.sum() == 0 and pred.mask_probability.sum() == 0


def test_defect_threshold_decides_presence_then_the_defect_class():
    soft = np.full((8, 8, 1), 0.9, np.float32)
    probs = np.array([0.45, 0.30, 0.25])  # argmax: good; P(defect) = 0.55
    assert postprocess(probs, soft, (8, 8), DecisionPolicy(CLASSES, 0.5)).label == "good"
    assert (
        postprocess(probs, soft, (8, 8), DecisionPolicy(CLASSES, 0.5, defect_threshold=0.5)).label
        == "crack"
    )
    strict = postprocess(probs, soft, (8, 8), DecisionPolicy(CLASSES, 0.5, defect_threshold=0.6))
    assert strict.label == "good" and strict.mask.sum() == 0


def test_encode_png_and_overlay():
    image = np.zeros((4, 4, 3), np.uint8)
    mask = np.eye(4, dtype=np.uint8)
    out = overlay(image, mask, (255, 0, 0), 1.0)
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [0, 0, 0]
    assert base64.b64decode(encode_png(image))[:4] == b"\x89PNG"


def test_overlay_in_bands_paints_exactly_as_on_the_whole_image():
    # 3 rows of 700,000 pixels: one row per band, so the bands' edges are crossed.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 700_000, 3), dtype=np.uint8)
    mask = rng.integers(0, 2, (3, 700_000), dtype=np.uint8)
    whole = image.copy()
    whole[mask.astype(bool)] = (
        whole[mask.astype(bool)] * (1 - 0.45) + np.array((1, 2, 3)) * 0.45
    ).astype(np.uint8)
    assert np.array_equal(overlay(image, mask, (1, 2, 3), 0.45), whole)
