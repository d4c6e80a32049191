"""The service's helpers that need no HTTP: the packed outputs of a batched forward pass, the
decoded-pixel budget and the decision who may use the review API."""

import numpy as np
import pytest

from defectflow.serving.settings import pack_outputs, unpack_outputs


def outputs(n, classes=6, size=8, grid=None):
    rng = np.random.default_rng(n)
    out = {
        "class": rng.random((n, classes), np.float32),
        "mask": rng.random((n, size, size, 1), np.float32),
    }
    if grid:
        out["anomaly"] = rng.random((n, *grid, 1), np.float32)
    return out


@pytest.mark.parametrize("grid", [None, (2, 3)])
def test_packed_outputs_unpack_to_the_same_arrays(grid):
    original = outputs(3, grid=grid)
    packed = pack_outputs(original)
    assert packed.shape == (3, 6 + 64 + (6 if grid else 0)) and packed.dtype == np.float32
    # Adaptive batching splits along the first axis: each row unpacks on its own too.
    for rows in (packed, packed[1:2]):
        back = unpack_outputs(rows, 6, 8, grid)
        assert set(back) == set(original)
        for name in original:
            np.testing.assert_array_equal(
                back[name], original[name][: len(rows)] if len(rows) == 3 else original[name][1:2]
            )


def test_unpacking_with_the_wrong_shapes_says_what_does_not_fit():
    with pytest.raises(ValueError, match="2x3 anomaly map"):
        unpack_outputs(pack_outputs(outputs(2)), 6, 8, (2, 3))
    with pytest.raises(ValueError, match="6 classes, a 8px mask"):
        unpack_outputs(pack_outputs(outputs(2, grid=(2, 3))), 6, 8)


# --- the pixel budget -------------------------------------------------------------------------


def test_a_request_over_its_pixel_budget_is_413_and_reserves_nothing():
    from defectflow.serving.settings import PixelBudget
    from defectflow.serving.uploads import UploadRejected

    budget = PixelBudget(max_request_pixels=100, max_inflight_pixels=250)
    message = "decode to 101 pixels, more than the limit of 100 pixels per request"
    with pytest.raises(UploadRejected, match=message) as refused, budget.reserve(101):
        pass
    assert refused.value.status_code == 413 and budget.in_flight == 0


def test_a_request_that_would_exceed_the_inflight_budget_is_503_with_retry_after():
    from defectflow.serving.settings import PixelBudget, ServerBusy

    budget = PixelBudget(max_request_pixels=100, max_inflight_pixels=250, retry_after_s=3)
    with budget.reserve(100), budget.reserve(100):
        assert budget.in_flight == 200
        message = "200 of its 250 decoded pixels are in use and this request needs 60"
        with pytest.raises(ServerBusy, match=message) as busy, budget.reserve(60):
            pass
        assert busy.value.status_code == 503 and busy.value.retry_after_s == 3
        with budget.reserve(50):  # what still fits is taken
            assert budget.in_flight == 250
    assert budget.in_flight == 0


def test_the_reservation_is_given_back_when_the_work_fails():
    from defectflow.serving.settings import PixelBudget

    budget = PixelBudget(max_request_pixels=100, max_inflight_pixels=100)
    for error in (ValueError("decoding failed"), MemoryError(), KeyboardInterrupt()):
        with pytest.raises(type(error)), budget.reserve(100):
            raise error
        assert budget.in_flight == 0
    with budget.reserve(100):  # the whole budget is free again
        pass


def test_concurrent_reservations_never_exceed_the_budget():
    import threading

    from defectflow.serving.settings import PixelBudget, ServerBusy

    budget = PixelBudget(max_request_pixels=30, max_inflight_pixels=100)
    seen, refused, lock = [], [0], threading.Lock()
    start = threading.Barrier(16)

    def client(pixels: int) -> None:
        start.wait()
        for _ in range(200):
            try:
                with budget.reserve(pixels):
                    seen.append(budget.in_flight)
            except ServerBusy:
                with lock:
                    refused[0] += 1

    threads = [threading.Thread(target=client, args=(10 + i % 3 * 10,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert max(seen) <= 100 and budget.in_flight == 0
    assert len(seen) + refused[0] == 16 * 200


def test_the_budget_comes_from_the_serve_config_and_must_hold_one_request():
    from defectflow.config import load_config
    from defectflow.serving.settings import PixelBudget

    budget = PixelBudget.from_config(load_config().serve)
    assert (budget.max_request_pixels, budget.max_inflight_pixels) == (48_000_000, 96_000_000)
    with pytest.raises(ValueError, match="at most max_inflight_pixels"):
        PixelBudget(max_request_pixels=200, max_inflight_pixels=100)
    with pytest.raises(ValueError, match="must be >= 1"):
        PixelBudget(max_request_pixels=0, max_inflight_pixels=100)


def test_the_default_budgets_refuse_32_images_at_the_pixel_limit_and_take_one():
    from defectflow.config import load_config

    serve = load_config().serve
    assert (
        32 * (serve.max_pixels - 1) > serve.max_request_pixels >= serve.max_pixels
    )  # one at the limit fits
    assert serve.max_inflight_pixels >= 2 * serve.max_pixels  # two such requests at once
    # ~11 bytes per decoded pixel at most (config.py): decoded images stay near 1 GB on a 4 GB machine.
    assert serve.max_inflight_pixels * 11 <= 1.1e9


# --- who may review ---------------------------------------------------------------------------


def _serve(inbox: bool, anonymous: bool = False):
    from defectflow.config import load_config

    return load_config(
        overrides=[
            f"serve.inbox.enabled={str(inbox).lower()}",
            f"serve.inbox.allow_anonymous_review={str(anonymous).lower()}",
        ]
    ).serve


def test_the_review_inbox_without_a_token_is_refused_unless_anonymous_review_is_allowed():
    from defectflow.serving.settings import (
        REVIEW_ACCESS_MESSAGES,
        ReviewAccessRefused,
        review_access,
    )

    with pytest.raises(ReviewAccessRefused) as refused:
        review_access(_serve(inbox=True), None)
    message = str(refused.value)
    assert message.startswith(
        "refusing to start: the review inbox is on (serve.inbox.enabled) but "
        "DEFECTFLOW_API_TOKEN is not set"
    )
    assert "serve.inbox.allow_anonymous_review=true" in message
    with pytest.raises(ReviewAccessRefused):
        review_access(_serve(inbox=True), "")  # blank is unset, as for the bearer-token middleware
    assert review_access(_serve(inbox=True), "s3cret") == "token_required"
    assert review_access(_serve(inbox=True, anonymous=True), "s3cret") == "token_required"
    assert review_access(_serve(inbox=True, anonymous=True), None) == "anonymous_allowed"
    assert review_access(_serve(inbox=False), None) == "off"
    assert set(REVIEW_ACCESS_MESSAGES) == {"off", "token_required", "anonymous_allowed"}
    assert "anonymous review allowed" in REVIEW_ACCESS_MESSAGES["anonymous_allowed"]


def test_the_refusal_names_the_configured_token_variable():
    from omegaconf import OmegaConf

    from defectflow.serving.settings import ReviewAccessRefused, review_access

    serve = _serve(inbox=True)
    OmegaConf.update(serve, "auth_token_env", "PLANT7_REVIEW_TOKEN")
    with pytest.raises(ReviewAccessRefused, match="PLANT7_REVIEW_TOKEN is not set"):
        review_access(serve, None)
