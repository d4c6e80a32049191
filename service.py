"""The defectflow HTTP service (BentoML 1.4): POST an image, get its defect class and mask.

    bentoml serve service:DefectInspection        # from the repository: the production model
    bentoml serve defectflow:latest                # a built Bento (see defectflow.registry)

Two BentoML services: `DefectInspection` answers HTTP (decode, checks, answer) and
`DefectModel` runs the forward pass with BentoML adaptive batching, so concurrent requests
share forward passes. The model is the one a built Bento pins (Bento argument `model_tag`),
else the DEFECTFLOW_MODEL_TAG environment variable, else the production model of the
registry (`defectflow models list`), never simply the newest in the store.
All logic lives in the `defectflow` package; this file only wires it to HTTP.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from pydantic import Field

from defectflow.artifacts import ModelInfo
from defectflow.registry import MODEL_TAG_ENV, production_tag
from defectflow.serving.guards import HEALTH_PATHS, guard_middlewares
from defectflow.serving.inbox import (
    AddResult,
    Inbox,
    InboxWriter,
    ReviewPolicy,
    parse_reviewer_tokens,
)
from defectflow.serving.settings import (
    REVIEW_ACCESS_MESSAGES,
    PixelBudget,
    ServerBusy,
    ServingSettings,
    answer,
    json_log_line,
    metadata,
    pack_outputs,
    prediction_record,
    review_access,
    unpack_outputs,
)
from defectflow.serving.uploads import (
    CheckedUpload,
    UploadLimits,
    UploadRejected,
    check_upload,
    decode_checked,
)
from defectflow.serving.web.api_docs import swagger_ui_page
from defectflow.serving.web.review import review_app
from defectflow.serving.web.ui import ui_app


def _model_tag() -> str:
    pinned = getattr(bentoml.use_arguments(), "model_tag", None) or os.environ.get(MODEL_TAG_ENV)
    if pinned:
        return pinned
    production = production_tag()
    if production is None:
        raise RuntimeError(
            "no production model in the registry: train one (`defectflow train`) or promote "
            f"one (`defectflow models promote TAG`), or set {MODEL_TAG_ENV}"
        )
    return production


MODEL_TAG = _model_tag()
MODEL = bentoml.models.BentoModel(MODEL_TAG)
MODEL_DIR = Path(MODEL.resolve().path)
SETTINGS = ServingSettings.for_model(MODEL_DIR)
# A TFLite model runs inside the HTTP process: LiteRT is light, runs one image per call
# whatever the batch (so batching saves no compute), and the hop to a second process cost
# 7.6 of 29 ms per request (benchmarks/serve_bench.py). A Keras model, which does gain from
# batches, runs in DefectModel behind BentoML's adaptive batching.
IN_PROCESS = ModelInfo.load(MODEL_DIR).serving_format == "tflite"
UPLOAD_LIMITS = UploadLimits.from_config(SETTINGS.serve)
# Decoded pixels per request and in flight, reserved from the headers before decoding.
PIXEL_BUDGET = PixelBudget.from_config(SETTINGS.serve)
API_TOKEN = os.environ.get(str(SETTINGS.serve.auth_token_env))
# Personal reviewer tokens, "name:token,..." (serve.inbox.reviewer_tokens_env): a review sent
# with one is recorded as that name, verified. A malformed list stops the service here.
REVIEWER_TOKENS = parse_reviewer_tokens(
    os.environ.get(str(SETTINGS.serve.inbox.reviewer_tokens_env))
)
# Raises (the service does not start) when the review API would write training data for anyone
# (review_access only asks whether a token is set: reviewer tokens alone guard /review too).
REVIEW_ACCESS = review_access(
    SETTINGS.serve, API_TOKEN or ("reviewer tokens" if REVIEWER_TOKENS else None)
)
# Uncertain answers are kept for review (serve.inbox): files + an SQLite index, written from a
# background thread after the answer is ready. The review API and page are at /review.
INBOX = (
    Inbox(
        SETTINGS.serve.inbox.path,
        int(SETTINGS.serve.inbox.max_items),
        int(SETTINGS.serve.inbox.max_bytes),
        incoming=SETTINGS.serve.inbox.incoming,
        # When votes are enough to write an item for training (min_reviews, trusted_reviewers).
        policy=ReviewPolicy.from_config(SETTINGS.serve.inbox),
    )
    if SETTINGS.serve.inbox.enabled
    else None
)

# One JSON object per prediction on stdout, apart from BentoML's own access log, and appended to
# serve.prediction_log when set (the nightly drift check reads it); a file that cannot be
# opened leaves stdout alone, said once.
prediction_log = logging.getLogger("defectflow.predictions")
if not prediction_log.handlers:
    _handler = logging.StreamHandler(sys.stdout)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    prediction_log.addHandler(_handler)
    prediction_log.setLevel(logging.INFO)
    prediction_log.propagate = False
    if SETTINGS.serve.prediction_log:
        try:
            Path(SETTINGS.serve.prediction_log).parent.mkdir(parents=True, exist_ok=True)
            _file = logging.FileHandler(SETTINGS.serve.prediction_log, encoding="utf-8")
            _file.setFormatter(_handler.formatter)
            prediction_log.addHandler(_file)
        except OSError as exc:
            prediction_log.warning(json_log_line({"event": "prediction_log", "error": str(exc)}))


class _Metrics:
    """Prometheus series on /metrics. Made when the service starts, not at import: a build
    imports this file again in the same process, and a series cannot be registered twice."""

    def __init__(self) -> None:
        self.latency = bentoml.metrics.Histogram(
            name="defectflow_prediction_latency_seconds",
            documentation="Time from upload received to answer ready, per image endpoint call",
            labelnames=["endpoint"],
            buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0),
        )
        self.by_class = bentoml.metrics.Counter(
            name="defectflow_predictions_total",
            documentation="Images answered, by predicted class",
            labelnames=["predicted_class"],
        )
        self.rejected = bentoml.metrics.Counter(
            name="defectflow_rejected_uploads_total",
            documentation="Uploads refused before an answer, by status: 4xx for the upload, 503 when the "
            "decoded pixels in flight are at their limit",
            labelnames=["status"],
        )
        self.inbox = bentoml.metrics.Counter(
            name="defectflow_inbox_items_total",
            documentation="Uncertain answers offered to the review inbox, by outcome: stored, "
            "refused_full (retention limit), refused_busy (writer queue full), error",
            labelnames=["outcome"],
        )


def _warm_up(predictor) -> None:
    """One forward pass: the first call builds kernels; /readyz answers only after it."""
    size = predictor.info.input_size
    predictor.backend(np.zeros((1, size, size, 3), np.float32))


class _BatchedForward:
    """A Predictor backend whose forward pass runs in DefectModel, behind adaptive batching.
    The images go as uint8: a quarter of the float32 bytes, and exact (the values are whole)."""

    format = "keras"

    def __init__(self, model_service, info) -> None:
        self.model_service = model_service
        self.n_classes, self.size = len(info.classes), info.input_size
        self.anomaly_grid = tuple(info.anomaly["grid"]) if info.anomaly else None

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        packed = self.model_service.forward(batch.round().astype(np.uint8))
        return unpack_outputs(packed, self.n_classes, self.size, self.anomaly_grid)


@bentoml.service(name="defectflow-model", workers=1, traffic={"timeout": 60})
class DefectModel:
    """The forward pass only: uint8 model inputs (N, S, S, 3) in, packed outputs out."""

    model_ref = MODEL

    def __init__(self) -> None:
        from defectflow.inference.predictor import Predictor  # TensorFlow loads here, not at build

        self.predictor = Predictor.load(self.model_ref.path)
        _warm_up(self.predictor)
        self.ready = True

    def __is_ready__(self) -> bool:
        return getattr(self, "ready", False)

    @bentoml.api(
        batchable=True,
        max_batch_size=int(SETTINGS.serve.batch.max_batch_size),
        max_latency_ms=int(SETTINGS.serve.batch.max_latency_ms),
    )
    def forward(self, images: np.ndarray) -> np.ndarray:
        return pack_outputs(self.predictor.backend(images.astype(np.float32)))


# FastAPI's /docs and /redoc load from CDNs: /docs is served with local files instead (no /redoc).
info_app = FastAPI(title="defectflow model information", docs_url=None, redoc_url=None)


@info_app.get("/docs", include_in_schema=False)
def api_docs() -> HTMLResponse:
    """The OpenAPI page (Swagger UI), its files from the Bento itself: works without internet."""
    return swagger_ui_page(info_app.title)


# With a Keras model, requests handled at once from more than one thread made the calls to
# DefectModel fail now and then (aiohttp ServerDisconnectedError, seen as HTTP 500 in the
# hostile-input test): that path keeps BentoML's default of one.
@bentoml.service(
    name="defectflow",
    workers=1,
    threads=int(SETTINGS.serve.threads) if IN_PROCESS else 1,
    traffic={"timeout": 60},
)
@bentoml.asgi_app(info_app, path="/")
@bentoml.asgi_app(ui_app(), path="/ui")
@bentoml.asgi_app(review_app(INBOX, API_TOKEN, reviewer_tokens=REVIEWER_TOKENS), path="/review")
class DefectInspection:
    # A class-level model reference: `bentoml build` packs this model into the Bento.
    model_ref = MODEL
    if not IN_PROCESS:
        model = bentoml.depends(DefectModel)

    def __init__(self) -> None:
        from defectflow.inference.predictor import Predictor
        from defectflow.registry import stage_of

        self.model_tag = str(self.model_ref.tag)
        if IN_PROCESS:
            self.predictor = Predictor.load(self.model_ref.path)
            _warm_up(self.predictor)
        else:
            info = ModelInfo.load(self.model_ref.path)
            self.predictor = Predictor(_BatchedForward(self.model, info), info)
        try:  # the registry is on the build machine, not in a container
            self.stage = stage_of(self.model_tag)
        except Exception:  # noqa: BLE001
            self.stage = None
        self.metadata = metadata(
            self.model_tag, self.stage, Path(self.model_ref.path), self.predictor.info, SETTINGS
        )
        self.metrics = _Metrics()
        self.inbox_writer = (
            InboxWriter(INBOX, on_result=self._inbox_outcome) if INBOX is not None else None
        )
        self._log(
            {
                "event": "start",
                "review_access": REVIEW_ACCESS,
                "message": REVIEW_ACCESS_MESSAGES[REVIEW_ACCESS],
                "review_policy": INBOX.policy.as_dict() if INBOX is not None else None,
                "reviewer_tokens": sorted(REVIEWER_TOKENS.values()),
                "max_request_pixels": PIXEL_BUDGET.max_request_pixels,
                "max_inflight_pixels": PIXEL_BUDGET.max_inflight_pixels,
            }
        )

    @info_app.get("/metadata")
    def model_metadata(self) -> dict:
        """The serving model: tag, registry stage, classes, input size, thresholds, test
        metrics, config digest, upload limits and the review inbox's counters."""
        inbox = {"enabled": self.inbox_writer is not None}
        if self.inbox_writer is not None:
            inbox.update(
                path=str(INBOX.root),
                incoming=str(INBOX.incoming),
                max_items=INBOX.max_items,
                max_bytes=INBOX.max_bytes,
                review_policy=INBOX.policy.as_dict(),
                counters=self.inbox_writer.counters,
            )
        return {**self.metadata, "inbox": inbox}

    def _inbox_outcome(self, result: AddResult) -> None:
        outcome = (
            "stored"
            if result.stored
            else "refused_full"
            if result.reason in ("full_items", "full_bytes")
            else "error"
        )
        self.metrics.inbox.labels(outcome=outcome).inc()
        if not result.stored:
            prediction_log.info(
                json_log_line(
                    {
                        "event": "inbox",
                        "outcome": outcome,
                        "reason": result.reason,
                        "error": result.message,
                    }
                )
            )

    def _keep_if_uncertain(self, data: bytes, result: dict) -> None:
        """Queue an uncertain answer for review (a missing `status` means accepted). Never
        raises and never waits for the disk: the prediction is already answered."""
        if self.inbox_writer is None or result.get("status", "accepted") != "uncertain":
            return
        try:
            kept = {k: v for k, v in result.items() if k != "overlay_png_base64"}
            if not self.inbox_writer.submit(data, kept, self.model_tag):
                self.metrics.inbox.labels(outcome="refused_busy").inc()
                prediction_log.info(
                    json_log_line(
                        {
                            "event": "inbox",
                            "outcome": "refused_busy",
                            "request_id": result.get("request_id"),
                        }
                    )
                )
        except Exception:  # noqa: BLE001
            logging.getLogger("defectflow.serving.inbox").exception(
                "could not queue an uncertain answer for review"
            )
            self.metrics.inbox.labels(outcome="error").inc()

    def _predict_images(self, images: list[np.ndarray]) -> list:
        return self.predictor.predict_arrays(images, batch_size=len(images))

    def _check(self, upload: Path) -> CheckedUpload:
        """The upload's checks, decoding nothing: its header says how many pixels it needs."""
        return check_upload(upload.read_bytes(), UPLOAD_LIMITS)

    def _log(self, record: dict) -> None:
        prediction_log.info(json_log_line(record))

    def _refuse(
        self,
        ctx: bentoml.Context,
        refusal: UploadRejected | ServerBusy,
        request_id: str,
        endpoint: str,
        started: float,
    ) -> dict:
        """The answer to a refused request: its status (503 with Retry-After when busy) and
        {"error", "request_id"}. Not `raise InvalidArgument`: BentoML 1.4.39 answers those with a JSON list."""
        ctx.response.status_code = refusal.status_code
        if isinstance(refusal, ServerBusy):
            ctx.response.headers["Retry-After"] = str(refusal.retry_after_s)
        self.metrics.rejected.labels(status=str(refusal.status_code)).inc()
        self._log(
            prediction_record(
                request_id,
                endpoint,
                self.model_tag,
                started,
                None,
                None,
                refusal.status_code,
                str(refusal),
            )
        )
        return {"error": str(refusal), "request_id": request_id}

    @bentoml.api(route="/predict")
    def predict(
        self,
        image: Annotated[
            Path,
            Field(
                description="The image file (PNG, JPEG, BMP or TIFF; gray, RGB, RGBA; "
                "8 or 16 bit), as multipart/form-data field `image`."
            ),
        ],
        ctx: bentoml.Context,
        overlay: Annotated[
            bool,
            Field(
                description="Also return `overlay_png_base64`: the image with the mask painted red."
            ),
        ] = False,
    ) -> dict:
        """Classify an image and localise its defect. The answer: `class` (the decided class),
        `probabilities` (per class, summing to 1), `is_defective`, `defect_area_fraction`,
        `mask_png_base64` (a PNG mask at the input's size, 255 = defect), `mask_size`
        ([width, height]), `model` (the model tag), `request_id`, and `overlay_png_base64` when
        asked. An upload that is not an acceptable image gets a 4xx status and {"error": "..."}.
        """
        started = time.perf_counter()
        request_id = ctx.request.headers.get("x-request-id") or uuid.uuid4().hex
        ctx.response.headers["X-Request-ID"] = request_id
        try:
            checked = self._check(image)
            # Everything that holds pixels at the image's size (decoding, the mask, the overlay)
            # runs inside the reservation, which is given back however this block ends.
            with PIXEL_BUDGET.reserve(checked.pixels):
                image_array = decode_checked(checked, UPLOAD_LIMITS)
                prediction = self._predict_images([image_array])[0]
                result = {
                    **answer(prediction, image_array, self.model_tag, overlay),
                    "request_id": request_id,
                }
                self._log(
                    prediction_record(
                        request_id, "/predict", self.model_tag, started, image_array, result, 200
                    )
                )
        except (UploadRejected, ServerBusy) as exc:
            return self._refuse(ctx, exc, request_id, "/predict", started)
        self.metrics.latency.labels(endpoint="/predict").observe(time.perf_counter() - started)
        self.metrics.by_class.labels(predicted_class=result["class"]).inc()
        self._keep_if_uncertain(checked.data, result)
        return result

    @bentoml.api(route="/predict_batch")
    def predict_batch(
        self,
        images: Annotated[
            list[Path],
            Field(description="Several image files, each as a multipart/form-data field `images`."),
        ],
        ctx: bentoml.Context,
    ) -> dict:
        """Classify several images in one call (one forward pass for all). The answer:
        `results`, one object per image in upload order, each as `/predict` answers it, and
        `model`. One unacceptable image fails the whole call with a 4xx status and
        {"error": "..."} naming it: nothing is half done. Images that decode to more than
        `serve.max_request_pixels` in all are refused (413) before any is decoded; 503 with
        Retry-After when the service holds too many decoded pixels to take them now.
        """
        started = time.perf_counter()
        request_id = ctx.request.headers.get("x-request-id") or uuid.uuid4().hex
        ctx.response.headers["X-Request-ID"] = request_id
        limit = int(SETTINGS.serve.max_batch_images)
        if not images or len(images) > limit:
            ctx.response.status_code = 413 if images else 400
            self.metrics.rejected.labels(status=str(ctx.response.status_code)).inc()
            return {
                "error": f"send between 1 and {limit} images as fields `images`, got {len(images)}",
                "request_id": request_id,
            }
        try:
            checked = [self._check_numbered(index, upload) for index, upload in enumerate(images)]
            # Every header is read before any image is decoded: the request's pixels are known.
            with PIXEL_BUDGET.reserve(sum(upload.pixels for upload in checked)):
                results = self._answer_batch(checked, request_id, started)
        except (UploadRejected, ServerBusy) as exc:
            return self._refuse(ctx, exc, request_id, "/predict_batch", started)
        self.metrics.latency.labels(endpoint="/predict_batch").observe(
            time.perf_counter() - started
        )
        for index, (upload, result) in enumerate(zip(checked, results, strict=True)):
            self.metrics.by_class.labels(predicted_class=result["class"]).inc()
            self._keep_if_uncertain(upload.data, {**result, "request_id": f"{request_id}/{index}"})
        return {"results": results, "model": self.model_tag, "request_id": request_id}

    def _check_numbered(self, index: int, upload: Path) -> CheckedUpload:
        try:
            return self._check(upload)
        except UploadRejected as exc:
            raise UploadRejected(
                exc.status_code, f"image {index} (counting from 0): {exc}"
            ) from exc

    def _answer_batch(
        self, checked: list[CheckedUpload], request_id: str, started: float
    ) -> list[dict]:
        """Decode, predict (one forward pass) and answer the images of a batch; call it only
        with their pixels reserved. UploadRejected names the image that could not be decoded."""
        arrays = []
        for index, upload in enumerate(checked):
            try:
                arrays.append(decode_checked(upload, UPLOAD_LIMITS))
            except UploadRejected as exc:
                raise UploadRejected(
                    exc.status_code, f"image {index} (counting from 0): {exc}"
                ) from exc
        results = [
            answer(p, a, self.model_tag)
            for p, a in zip(self._predict_images(arrays), arrays, strict=True)
        ]
        for index, (array, result) in enumerate(zip(arrays, results, strict=True)):
            self._log(
                prediction_record(
                    f"{request_id}/{index}",
                    "/predict_batch",
                    self.model_tag,
                    started,
                    array,
                    result,
                    200,
                )
            )
        return results


# Outermost first: bearer auth (DEFECTFLOW_API_TOKEN), the request size cap, the multipart guard.
# /review is exempt here only so its page loads without a token: review_app checks the same
# token itself on everything under /review but the page.
for _middleware, _options in guard_middlewares(
    token=API_TOKEN,
    file_fields={"/predict": ["image"], "/predict_batch": ["images"]},
    max_bytes=int(SETTINGS.serve.max_upload_bytes),
    path_max_bytes={
        "/predict_batch": int(SETTINGS.serve.max_upload_bytes)
        * int(SETTINGS.serve.max_batch_images)
    },
    auth_exempt=(*HEALTH_PATHS, "/ui", "/review"),
):  # the pages load without a token, then send it
    DefectInspection.add_asgi_middleware(_middleware, **_options)
