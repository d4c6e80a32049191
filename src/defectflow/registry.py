"""The model registry: the BentoML model store plus one stage book per model name.

Models are saved with `bentoml.models.create` (a plain folder: `model.keras`, `model.json`,
`config.yaml`, `metrics.json`, ...) with their metrics, config, data fingerprint and a
SHA-256 of every file as metadata. Which model is `production` is not a label spread over
many model folders (changing several files is never atomic) but one small JSON stage book
per model name beside the store, `$BENTOML_HOME/registry/<name>.json`:

    {"name": ..., "lineage": [tags promoted to production, current last],
     "archived": [tags], "history": [{"time", "action", "tag", "previous", "reason", "user"}]}

`production` is the last tag of `lineage`, so there is exactly one by construction; every
other model is `candidate` unless archived. The book is replaced with write-to-temporary,
fsync, `os.replace` under an exclusive file lock: a process killed at any instant leaves
either the old book or the new one, never a mix. A model is checked complete (every file
present with its recorded SHA-256) before it may become production.

The store lives under BENTOML_HOME; call `defectflow.environment.configure_environment()`
before the first use (the CLI and the flows do), or state ends up in ~/bentoml.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import getpass
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from defectflow.artifacts import LISTED_METRICS, METRICS_FILE, MODEL_FILE, MODEL_INFO_FILE
from defectflow.files import atomic_write

#: service.py reads the model to serve from this variable when it is not a built Bento's.
MODEL_TAG_ENV = "DEFECTFLOW_MODEL_TAG"
#: The Bento argument (`bentoml.use_arguments()`) a built Bento pins its model with.
MODEL_TAG_ARG = "model_tag"
DEFAULT_MODEL_NAME = "defectflow"
STAGES = ("candidate", "production", "archived")
#: BentoML's own file in every model folder; an artifact must not overwrite it.
_BENTOML_MODEL_YAML = "model.yaml"
#: Metrics `list_models` shows, when the model's metadata has them.
_CHUNK = 1 << 20


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; the message says why and what to do."""


class ModelNotFound(RegistryError, LookupError):
    """A tag that is not in the model store."""


class IncompleteModel(RegistryError):
    """A stored model with a missing or altered file."""


# --- saving and reading models ---------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(model_dir: Path) -> dict[str, str]:
    """SHA-256 of every file in a model folder (relative path -> hex), BentoML's file excluded."""
    return {
        path.relative_to(model_dir).as_posix(): sha256_file(path)
        for path in sorted(Path(model_dir).rglob("*"))
        if path.is_file() and path.relative_to(model_dir).as_posix() != _BENTOML_MODEL_YAML
    }


def code_revision(repo: Path | None = None) -> str:
    """The git commit of the code (with "-dirty" for uncommitted changes), else the version."""
    from defectflow import __version__

    repo = repo or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"defectflow {__version__} (no git checkout)"
    return head + ("-dirty" if dirty else "")


def save_model(model_dir: Path, name: str, metadata: dict, labels: dict | None = None) -> str:
    """Copy a model artifact folder into the model store as a candidate; return "name:version".

    `metadata` must be JSON-able (metrics, config, dataset info...); the SHA-256 of every
    file is added as `files`, so the registry can later tell a complete copy from a damaged one.
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
        metadata = _without_none(
            json.loads(json.dumps({**metadata, "files": file_digests(model_dir)}))
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model metadata must be JSON-able: {exc}") from exc
    labels = {"project": "defectflow", **{str(k): str(v) for k, v in (labels or {}).items()}}

    with bentoml.models.create(name, labels=labels, metadata=metadata) as bento_model:
        shutil.copytree(model_dir, bento_model.path, dirs_exist_ok=True)
    return str(bento_model.tag)


def _without_none(value):
    """BentoML refuses None anywhere in metadata: a missing key means None (`.get` reads it back)."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value if v is not None]
    return value


def model_dir(tag: str) -> Path:
    """The store folder of a saved model, which `Predictor.load` takes."""
    return Path(_get_model(tag).path)


def model_metadata(tag: str) -> dict:
    return dict(_get_model(tag).info.metadata)


def resolve_tag(tag: str) -> str:
    """An exact "name:version" for a tag; "name:latest" and "name" mean the newest saved."""
    return str(_get_model(tag).tag)


def verify_model(tag: str) -> Path:
    """The model's folder after checking every recorded file is present and unaltered."""
    model = _get_model(tag)
    path = Path(model.path)
    recorded = model.info.metadata.get("files")
    if not recorded:
        raise IncompleteModel(
            f"model {model.tag} has no file digests in its metadata: it was not saved "
            "by defectflow and cannot be checked"
        )
    actual = file_digests(path)
    missing = sorted(set(recorded) - set(actual))
    if missing:
        raise IncompleteModel(
            f"model {model.tag} is incomplete: missing {', '.join(missing)} in {path}"
        )
    altered = sorted(f for f, digest in recorded.items() if actual[f] != digest)
    if altered:
        raise IncompleteModel(
            f"model {model.tag} is damaged: {', '.join(altered)} changed since it was saved "
            f"(SHA-256 mismatch in {path})"
        )
    return path


# --- stages ----------------------------------------------------------------------------------


def registry_dir() -> Path:
    return Path(os.environ.get("BENTOML_HOME", "~/bentoml")).expanduser() / "registry"


def _book_path(name: str) -> Path:
    return registry_dir() / f"{name}.json"


def _read_book(name: str) -> dict:
    path = _book_path(name)
    try:
        book = json.loads(path.read_text())
    except FileNotFoundError:
        return {"name": name, "lineage": [], "archived": [], "history": []}
    except ValueError as exc:  # only a hand edit can do this: replacement is atomic
        raise RegistryError(
            f"stage book {path} is not valid JSON ({exc}); restore it or delete it "
            "to start again with no production model"
        ) from None
    return book


def _write_book(book: dict) -> None:
    """Atomic replacement: temporary file, fsync, rename, fsync of the folder."""
    atomic_write(_book_path(book["name"]), json.dumps(book, indent=2).encode())


@contextlib.contextmanager
def _locked_book(name: str):
    """The stage book of `name`, held under an exclusive lock; written back if changed."""
    registry_dir().mkdir(parents=True, exist_ok=True)
    with open(registry_dir() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Temporaries of writers killed before their rename; nobody else writes while we hold the lock.
        for stale in registry_dir().glob(f".{name}.json.*.tmp"):
            stale.unlink(missing_ok=True)
        book = _read_book(name)
        before = json.dumps(book, sort_keys=True)
        yield book
        if json.dumps(book, sort_keys=True) != before:
            _write_book(book)


def production_tag(name: str = DEFAULT_MODEL_NAME) -> str | None:
    lineage = _read_book(name)["lineage"]
    return lineage[-1] if lineage else None


def stage_of(tag: str) -> str:
    tag = resolve_tag(tag)
    book = _read_book(tag.split(":")[0])
    if book["lineage"] and book["lineage"][-1] == tag:
        return "production"
    return "archived" if tag in book["archived"] else "candidate"


def history(name: str = DEFAULT_MODEL_NAME) -> list[dict]:
    return list(_read_book(name)["history"])


def _event(action: str, tag: str, previous: str | None, reason: str) -> dict:
    return {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "action": action,
        "tag": tag,
        "previous": previous,
        "reason": reason,
        "user": _user(),
    }


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def promote(tag: str, reason: str = "") -> dict:
    """Make `tag` the production model of its name; the previous one becomes archived."""
    tag = resolve_tag(tag)
    verify_model(tag)
    name = tag.split(":")[0]
    with _locked_book(name) as book:
        previous = book["lineage"][-1] if book["lineage"] else None
        if previous == tag:
            return _event("promote", tag, previous, "already production")
        book["lineage"] = [t for t in book["lineage"] if t != tag] + [tag]
        book["archived"] = sorted({*book["archived"], *([previous] if previous else [])} - {tag})
        event = _event("promote", tag, previous, reason)
        book["history"].append(event)
    return event


def rollback(name: str = DEFAULT_MODEL_NAME, reason: str = "") -> dict:
    """Restore the production model before the current one; the current one becomes archived."""
    with _locked_book(name) as book:
        if len(book["lineage"]) < 2:
            current = book["lineage"][-1] if book["lineage"] else None
            raise RegistryError(
                f"no earlier production model of {name!r} to roll back to "
                f"(production: {current or 'none'})"
            )
        current, restored = book["lineage"][-1], book["lineage"][-2]
        verify_model(restored)
        book["lineage"] = book["lineage"][:-1]
        book["archived"] = sorted({*book["archived"], current} - {restored})
        event = _event("rollback", restored, current, reason)
        book["history"].append(event)
    return event


def archive(tag: str, reason: str = "") -> dict:
    """Mark a candidate (or an earlier production model) archived; production cannot be."""
    tag = resolve_tag(tag)
    name = tag.split(":")[0]
    with _locked_book(name) as book:
        if book["lineage"] and book["lineage"][-1] == tag:
            raise RegistryError(
                f"{tag} is the production model: promote another model or roll back first"
            )
        if tag in book["archived"]:
            return _event("archive", tag, None, "already archived")
        book["archived"] = sorted({*book["archived"], tag})
        event = _event("archive", tag, None, reason)
        book["history"].append(event)
    return event


# --- listing and packaging -------------------------------------------------------------------


def list_models(name: str = DEFAULT_MODEL_NAME) -> list[dict]:
    """The saved models called `name`, newest first: tag, creation time, stage, metrics."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        models = bentoml.models.list(name)
    except NotFound:  # BentoML raises rather than return no models
        return []
    models.sort(key=lambda m: m.info.creation_time, reverse=True)
    book = _read_book(name)
    production = book["lineage"][-1] if book["lineage"] else None
    rows = []
    for model in models:
        tag = str(model.tag)
        metadata = model.info.metadata
        metrics = metadata.get("metrics") or _metrics_file(Path(model.path))
        decision = metadata.get("gate") or {}
        rows.append(
            {
                "tag": tag,
                "stage": "production"
                if tag == production
                else "archived"
                if tag in book["archived"]
                else "candidate",
                "creation_time": model.info.creation_time.isoformat(timespec="seconds"),
                "labels": dict(model.info.labels),
                "metrics": {k: metrics[k] for k in LISTED_METRICS if k in metrics},
                "gate": decision.get("message", ""),
            }
        )
    return rows


#: What only a Keras-format model needs at serving time; a TFLite model serves without it.
KERAS_ONLY_PACKAGES = ("tensorflow-cpu", "tensorflow", "keras")


def build_bento(model_tag: str, bentofile: Path, build_ctx: Path) -> str:
    """Build the Bento of service.py serving the model `model_tag`; return the Bento's tag.

    The tag is resolved first, so the Bento always pins one exact model version. A model that
    serves from TFLite gets a Bento without TensorFlow and Keras (LiteRT runs it): a smaller
    image and a smaller server. Works offline: the bentofile must keep
    `python: lock_packages: false`.
    """
    import tempfile

    import bentoml
    import yaml

    from defectflow.artifacts import ModelInfo

    pinned = resolve_tag(model_tag)
    serving_format = ModelInfo.load(model_dir(pinned)).serving_format
    spec = yaml.safe_load(Path(bentofile).read_text())
    if serving_format == "tflite":
        spec["python"]["packages"] = [
            p
            for p in spec["python"]["packages"]
            if p.split("==")[0].split("[")[0] not in KERAS_ONLY_PACKAGES
        ]
    with tempfile.TemporaryDirectory() as tmp, _env(MODEL_TAG_ENV, pinned):
        effective = Path(tmp) / "bentofile.yaml"
        effective.write_text(yaml.safe_dump(spec, sort_keys=False))
        bento = bentoml.bentos.build_bentofile(
            str(effective),
            build_ctx=str(build_ctx),
            labels={**spec.get("labels", {}), "serving_format": serving_format},
            # Stored in bento.yaml and restored when the Bento is served, so the served model
            # is the pinned one whatever the registry says later.
            args={MODEL_TAG_ARG: pinned},
            # service.py pins its model at import time: re-import it for every build.
            reload=True,
        )
    packed = [str(m.tag) for m in bento.info.all_models]
    if pinned not in packed:  # pragma: no cover - a service.py that ignores the pin
        raise RuntimeError(f"bento {bento.tag} packs {packed}, not the requested model {pinned}")
    return str(bento.tag)


def bento_of(model_tag: str, bento_name: str = DEFAULT_MODEL_NAME) -> str | None:
    """The newest built Bento that packs `model_tag`, if any."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentos = bentoml.bentos.list(bento_name)
    except NotFound:
        return None
    bentos.sort(key=lambda b: b.info.creation_time, reverse=True)
    for bento in bentos:
        if model_tag in (str(m.tag) for m in bento.info.all_models):
            return str(bento.tag)
    return None


def _get_model(tag: str):
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        return bentoml.models.get(tag)
    except NotFound:
        try:
            models = sorted(bentoml.models.list(), key=lambda m: m.info.creation_time, reverse=True)
        except NotFound:
            models = []
        known = [str(m.tag) for m in models[:20]] + (["..."] if len(models) > 20 else [])
        store = os.environ.get("BENTOML_HOME", "~/bentoml")
        raise ModelNotFound(
            f"model {tag!r} is not in the BentoML model store ({store}); "
            f"available (newest first): {', '.join(known) if known else 'none'}"
        ) from None
    except BentoMLException as exc:  # e.g. a malformed tag, or a damaged model.yaml
        raise ModelNotFound(f"cannot read model {tag!r} from the store: {exc}") from None


def _metrics_file(path: Path) -> dict:
    try:
        return json.loads((path / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
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
