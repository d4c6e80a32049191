"""The BentoML model store and Bento builds: where trained models are kept and packaged.

A model is saved as a plain folder (`model.keras`, `model.json`, `config.yaml`,
`metrics.json`) into the BentoML 1.4 model store with `bentoml.models.create`, with its
metrics, config digest and dataset info as metadata. `build_bento` packs `service.py`, the
`defectflow` package and one pinned model into a Bento.

The store lives under BENTOML_HOME; call `defectflow.environment.configure_environment()`
before the first use (the CLI and the flows do), or state ends up in ~/bentoml.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from defectflow.inference import METRICS_FILE, MODEL_FILE, MODEL_INFO_FILE

#: service.py reads the model to serve from this variable when it is not a built Bento's.
MODEL_TAG_ENV = "DEFECTFLOW_MODEL_TAG"
#: The Bento argument (`bentoml.use_arguments()`) a built Bento pins its model with.
MODEL_TAG_ARG = "model_tag"
#: BentoML's own file in every model folder; an artifact must not overwrite it.
_BENTOML_MODEL_YAML = "model.yaml"
#: Metrics `list_models` shows, when the model's metadata has them.
_LISTED_METRICS = ("accuracy", "presence_accuracy", "defect_accuracy", "defect_dice", "auroc")


def save_model(
    model_dir: Path, name: str, metadata: dict, labels: dict | None = None
) -> str:
    """Copy a model artifact folder into the model store; return its tag "name:version".

    `metadata` must be JSON-able (metrics, config digest, dataset info...); `labels` are
    string pairs such as {"stage": "candidate"}.
    """
    import bentoml

    model_dir = Path(model_dir)
    missing = [f for f in (MODEL_FILE, MODEL_INFO_FILE) if not (model_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} is not a defectflow model folder: missing {missing}")
    if (model_dir / _BENTOML_MODEL_YAML).exists():
        raise ValueError(f"{model_dir / _BENTOML_MODEL_YAML} would overwrite BentoML's own file")
    try:
        # A JSON round trip rejects what the store could not keep, and copies: BentoML
        # normalises the metadata dict in place.
        metadata = json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model metadata must be JSON-able: {exc}") from exc
    labels = {str(k): str(v) for k, v in (labels or {}).items()}

    with bentoml.models.create(name, labels=labels, metadata=metadata) as bento_model:
        shutil.copytree(model_dir, bento_model.path, dirs_exist_ok=True)
    return str(bento_model.tag)


def model_dir(tag: str) -> Path:
    """The store folder of a saved model, which `Predictor.load` takes."""
    return Path(_get_model(tag).path)


def list_models(name: str) -> list[dict]:
    """The saved models called `name`, newest first: tag, creation time, labels, metrics."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        models = bentoml.models.list(name)
    except NotFound:  # BentoML raises rather than return no models
        return []
    models.sort(key=lambda m: m.info.creation_time, reverse=True)
    rows = []
    for model in models:
        metrics = model.info.metadata.get("metrics") or _metrics_file(Path(model.path))
        rows.append({
            "tag": str(model.tag),
            "creation_time": model.info.creation_time.isoformat(),
            "labels": dict(model.info.labels),
            "metrics": {k: metrics[k] for k in _LISTED_METRICS if k in metrics},
        })
    return rows


def build_bento(model_tag: str, bentofile: Path, build_ctx: Path) -> str:
    """Build the Bento of service.py serving the model `model_tag`; return the Bento's tag.

    A tag such as "defectflow:latest" is resolved first, so the Bento always pins one exact
    model version. Works offline: the bentofile must keep `python: lock_packages: false`.
    """
    import bentoml

    pinned = str(_get_model(model_tag).tag)
    with _env(MODEL_TAG_ENV, pinned):
        bento = bentoml.bentos.build_bentofile(
            str(bentofile),
            build_ctx=str(build_ctx),
            # Stored in bento.yaml and restored when the Bento is served, so the served model
            # is the pinned one even after newer models were saved to the store.
            args={MODEL_TAG_ARG: pinned},
            # service.py pins its model at import time: re-import it for every build.
            reload=True,
        )
    packed = [str(m.tag) for m in bento.info.all_models]
    if pinned not in packed:  # pragma: no cover - a service.py that ignores the pin
        raise RuntimeError(f"bento {bento.tag} packs {packed}, not the requested model {pinned}")
    return str(bento.tag)


def _get_model(tag: str):
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return bentoml.models.get(tag)
    except NotFound:
        models = sorted(bentoml.models.list(), key=lambda m: m.info.creation_time, reverse=True)
        known = [str(m.tag) for m in models[:20]] + (["..."] if len(models) > 20 else [])
        store = os.environ.get("BENTOML_HOME", "~/bentoml")
        raise LookupError(
            f"model {tag!r} is not in the BentoML model store ({store}); "
            f"available (newest first): {', '.join(known) if known else 'none'}"
        ) from None


def _metrics_file(path: Path) -> dict:
    try:
        return json.loads((path / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}


@contextmanager
def _env(key: str, value: str):
    previous = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous
