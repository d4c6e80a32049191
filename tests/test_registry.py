"""defectflow.registry against a real BentoML 1.4 store in a temporary DEFECTFLOW_HOME.

BentoML fixes its store folder the first time it is used in a process, so the store
scenario runs in a fresh interpreter (this file, run as a script) with its own
DEFECTFLOW_HOME; the tests assert on the report it writes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers_models import CLASSES, make_tiny_model_dir

from defectflow import registry
from defectflow.environment import configure_environment

REPO_ROOT = Path(__file__).resolve().parents[1]


def _scenario(home: Path, first: Path, second: Path) -> dict:
    """Save two models, list them, look one up, build a Bento of the first (older) one."""
    configure_environment(home)
    import bentoml

    report: dict = {"bentoml_home": os.environ["BENTOML_HOME"]}
    metadata = {
        "metrics": {"accuracy": 0.75, "defect_dice": 0.5, "loss": 1.0},
        "classes": CLASSES,
        "config_sha256": "0" * 64,
        "data_root": "/data/capsule",
    }
    older = registry.save_model(first, "defectflow", metadata, labels={"line": "3"})
    newer = registry.save_model(second, "defectflow", {"metrics": {"accuracy": 0.5}})
    report["tags"] = [older, newer]
    stored = registry.model_dir(older)
    report["model_dir"] = str(stored)
    report["model_files"] = sorted(p.name for p in stored.iterdir())
    report["metadata"] = bentoml.models.get(older).info.metadata
    report["listed"] = registry.list_models("defectflow")
    report["listed_unknown"] = registry.list_models("no_such_model")
    try:
        registry.model_dir("defectflow:doesnotexist")
    except LookupError as exc:
        report["lookup_error"] = str(exc)

    os.environ["DEFECTFLOW_MODEL_TAG"] = "untouched"
    bento_tag = registry.build_bento(older, REPO_ROOT / "bentofile.yaml", REPO_ROOT)
    report["env_after_build"] = os.environ["DEFECTFLOW_MODEL_TAG"]
    bento = bentoml.get(bento_tag)
    bento_root = Path(bento.path)
    report["bento"] = {
        "tag": bento_tag,
        "models": [str(m.tag) for m in bento.info.all_models],
        "args": dict(bento.info.args),
        "labels": dict(bento.info.labels),
        "files": sorted(
            str(p.relative_to(bento_root)) for p in bento_root.rglob("*") if p.is_file()
        ),
        "requirements": (bento_root / "env/python/requirements.txt").read_text().split(),
    }
    # A model that serves from TFLite gets a Bento without TensorFlow and Keras.
    from defectflow.artifacts import ModelInfo
    from defectflow.training.export import export_tflite

    lean_dir = first.parent / "lean"
    shutil.copytree(first, lean_dir)
    export_tflite(lean_dir)
    info = ModelInfo.load(lean_dir)
    info.serving_format = "tflite"
    info.save(lean_dir)
    lean = registry.save_model(lean_dir, "leanmodel", {"metrics": {"accuracy": 0.5}})
    lean_bento = bentoml.get(registry.build_bento(lean, REPO_ROOT / "bentofile.yaml", REPO_ROOT))
    report["lean_bento"] = {
        "labels": dict(lean_bento.info.labels),
        "requirements": (Path(lean_bento.path) / "env/python/requirements.txt").read_text().split(),
    }
    # A Bento built from "name:latest" pins the version that was latest at build time.
    report["latest_bento_models"] = [
        str(m.tag)
        for m in bentoml.get(
            registry.build_bento("defectflow:latest", REPO_ROOT / "bentofile.yaml", REPO_ROOT)
        ).info.all_models
    ]
    return report


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("registry")
    first = make_tiny_model_dir(root / "first", accuracy=0.75)
    second = make_tiny_model_dir(root / "second", seed=1)
    out = root / "report.json"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DEFECTFLOW_", "BENTOML_", "PREFECT_", "KERAS_"))
    }
    env["DEFECTFLOW_HOME"] = str(root / "home")
    subprocess.run(
        [sys.executable, __file__, str(root / "home"), str(first), str(second), str(out)],
        env=env,
        cwd=root,
        check=True,
        timeout=300,
    )
    return json.loads(out.read_text())


@pytest.mark.integration
def test_store_is_under_defectflow_home(report):
    assert report["bentoml_home"].endswith(os.path.join("home", "bentoml"))
    assert report["model_dir"].startswith(report["bentoml_home"])


@pytest.mark.integration
def test_save_model_copies_the_artifact_and_metadata(report):
    older, _ = report["tags"]
    assert older.startswith("defectflow:")
    assert {"model.keras", "model.json", "config.yaml", "metrics.json"} <= set(
        report["model_files"]
    )
    assert report["metadata"]["metrics"]["accuracy"] == 0.75
    assert report["metadata"]["classes"] == CLASSES


@pytest.mark.integration
def test_list_models_newest_first_with_labels_and_metrics(report):
    older, newer = report["tags"]
    listed = report["listed"]
    assert [row["tag"] for row in listed] == [newer, older]
    assert listed[1]["labels"] == {"project": "defectflow", "line": "3"}
    assert [row["stage"] for row in listed] == ["candidate", "candidate"]
    assert listed[1]["metrics"] == {"accuracy": 0.75, "defect_dice": 0.5}
    assert listed[0]["creation_time"] >= listed[1]["creation_time"]
    assert report["listed_unknown"] == []


@pytest.mark.integration
def test_model_dir_of_unknown_tag_is_a_clear_lookup_error(report):
    message = report["lookup_error"]
    assert "defectflow:doesnotexist" in message
    for tag in report["tags"]:
        assert tag in message


@pytest.mark.integration
def test_build_bento_pins_the_model_and_packs_the_package(report):
    older, newer = report["tags"]
    bento = report["bento"]
    assert bento["tag"].startswith("defectflow:")
    assert bento["models"] == [older]
    assert bento["args"] == {"model_tag": older}
    assert bento["labels"]["project"] == "defectflow"
    files = set(bento["files"])
    assert {
        "src/service.py",
        "src/defectflow/__init__.py",
        "src/defectflow/inference/predictor.py",
        "src/defectflow/inference/preprocessing.py",
    } <= files
    assert not any(f.startswith(("src/tests/", "src/.venv/", "src/.defectflow/")) for f in files)
    assert "tensorflow-cpu==2.21.0" in bento["requirements"]
    assert "keras==3.15.1" in bento["requirements"]
    assert bento["labels"]["serving_format"] == "keras"
    assert report["env_after_build"] == "untouched"
    assert report["latest_bento_models"] == [newer]


@pytest.mark.integration
def test_a_tflite_model_gets_a_bento_without_tensorflow(report):
    lean = report["lean_bento"]
    assert lean["labels"]["serving_format"] == "tflite"
    assert "ai-edge-litert==2.3.0" in lean["requirements"]
    assert not [r for r in lean["requirements"] if r.startswith(("tensorflow", "keras"))]


def test_save_model_rejects_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.keras"):
        registry.save_model(tmp_path, "defectflow", {})


def test_save_model_rejects_metadata_that_is_not_json(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"")
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(ValueError, match="JSON-able"):
        registry.save_model(tmp_path, "defectflow", {"when": object()})


@pytest.fixture
def three_models(tmp_path) -> list[str]:
    """Three saved models under a model name of their own (the session store is shared)."""
    name = f"stages{uuid.uuid4().hex[:8]}"
    return [
        registry.save_model(
            make_tiny_model_dir(tmp_path / str(i), seed=i), name, {"metrics": {"accuracy": i}}
        )
        for i in range(3)
    ]


def test_promote_keeps_exactly_one_production_and_archives_the_previous(three_models):
    a, b, c = three_models
    name = a.split(":")[0]
    assert registry.production_tag(name) is None
    assert registry.promote(a, reason="first")["previous"] is None
    event = registry.promote(b, reason="better")
    assert (event["tag"], event["previous"], event["reason"]) == (b, a, "better")
    stages = {row["tag"]: row["stage"] for row in registry.list_models(name)}
    assert stages == {a: "archived", b: "production", c: "candidate"}
    assert registry.production_tag(name) == b
    assert [e["action"] for e in registry.history(name)] == ["promote", "promote"]


def test_rollback_restores_the_previous_production_model(three_models):
    a, b, _ = three_models
    name = a.split(":")[0]
    registry.promote(a)
    registry.promote(b)
    event = registry.rollback(name, reason="b misbehaves")
    assert (event["action"], event["tag"], event["previous"]) == ("rollback", a, b)
    assert registry.production_tag(name) == a
    assert registry.stage_of(b) == "archived"
    with pytest.raises(registry.RegistryError, match="no earlier production model"):
        registry.rollback(name)
    assert registry.production_tag(name) == a


def test_archive_refuses_the_production_model(three_models):
    a, _, c = three_models
    registry.promote(a)
    with pytest.raises(registry.RegistryError, match="is the production model"):
        registry.archive(a)
    registry.archive(c, reason="never used")
    assert registry.stage_of(c) == "archived"
    registry.promote(c)  # an archived model can come back
    assert registry.stage_of(c) == "production" and registry.stage_of(a) == "archived"


def test_a_damaged_or_unknown_model_is_never_promoted(three_models):
    a, b, _ = three_models
    name = a.split(":")[0]
    registry.promote(a)
    book = (registry.registry_dir() / f"{name}.json").read_bytes()
    weights = registry.model_dir(b) / "model.keras"
    weights.write_bytes(weights.read_bytes()[:-10])  # a truncated copy
    with pytest.raises(registry.IncompleteModel, match=r"model.keras changed since it was saved"):
        registry.promote(b)
    with pytest.raises(registry.ModelNotFound, match="is not in the BentoML model store"):
        registry.promote(f"{name}:doesnotexist")
    (registry.model_dir(b) / "model.json").unlink()
    with pytest.raises(registry.IncompleteModel, match="missing model.json"):
        registry.verify_model(b)
    assert (registry.registry_dir() / f"{name}.json").read_bytes() == book
    assert registry.production_tag(name) == a


_PROMOTER = """
import json, sys
from defectflow.environment import configure_environment
configure_environment()
from defectflow import registry
process, tags = sys.argv[1], sys.argv[2:]
for tag in tags:
    registry.resolve_tag(tag)  # the store read once: every round starts from the same point
print("ready", flush=True)
round_ = 0
for line in sys.stdin:  # one "go" per round: the parent's barrier
    event = registry.promote(tags[round_ % len(tags)], reason=f"{process} round {round_}")
    print(json.dumps(event), flush=True)
    round_ += 1
"""


def test_concurrent_promotions_keep_one_production_and_a_consistent_history(tmp_path):
    """Two processes, released together by a barrier every round, each promote one of their
    own two models (never the current production model, so every promotion must count) for
    several rounds. Afterwards: one production model, every promotion recorded exactly once,
    each event's `previous` the production model the one before it made, the rounds in
    order, and the stage book equal to replaying that history."""
    rounds = 6
    name = f"race{uuid.uuid4().hex[:8]}"
    tags = [
        registry.save_model(
            make_tiny_model_dir(tmp_path / str(i), seed=i), name, {"metrics": {"accuracy": i}}
        )
        for i in range(4)
    ]
    own = {"A": tags[:2], "B": tags[2:]}
    procs = {
        p: subprocess.Popen(
            [sys.executable, "-c", _PROMOTER, p, *models],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for p, models in own.items()
    }
    returned: dict[str, dict] = {}
    try:
        for proc in procs.values():
            assert proc.stdout.readline().strip() == "ready", proc.communicate(timeout=60)
        for _ in range(rounds):
            for proc in procs.values():  # both released at once ...
                proc.stdin.write("go\n")
                proc.stdin.flush()
            for proc in procs.values():  # ... and both done before the next round
                line = proc.stdout.readline()
                assert line, proc.communicate(timeout=60)
                event = json.loads(line)
                returned[event["reason"]] = event
        for proc in procs.values():
            proc.stdin.close()
            assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()

    expected = {f"{p} round {r}" for p in own for r in range(rounds)}
    assert set(returned) == expected
    recorded = registry.history(name)
    assert [e["action"] for e in recorded] == [
        "promote"
    ] * 2 * rounds  # every promotion once, nothing else
    assert sorted(e["reason"] for e in recorded) == sorted(expected)
    for i, event in enumerate(recorded):  # rounds in order: round r's two events are 2r and 2r+1
        assert event["reason"].endswith(f" round {i // 2}"), [e["reason"] for e in recorded]
        assert event["previous"] == (recorded[i - 1]["tag"] if i else None), recorded
        process, round_ = event["reason"].split(" round ")
        assert event["tag"] == own[process][int(round_) % 2]
        assert (
            returned[event["reason"]] == event
        )  # what each process was told is what the book says
    assert [e["time"] for e in recorded] == sorted(e["time"] for e in recorded)

    lineage: list[str] = []  # the stage book must be the replay of its history
    archived: set[str] = set()
    for event in recorded:
        archived = (archived | ({lineage[-1]} if lineage else set())) - {event["tag"]}
        lineage = [t for t in lineage if t != event["tag"]] + [event["tag"]]
    book = json.loads((registry.registry_dir() / f"{name}.json").read_text())
    assert book["lineage"] == lineage and sorted(book["archived"]) == sorted(archived)
    assert registry.production_tag(name) == recorded[-1]["tag"] == lineage[-1]
    stages = {row["tag"]: row["stage"] for row in registry.list_models(name)}
    assert sorted(stages.values()) == ["archived"] * 3 + ["production"]
    assert stages[recorded[-1]["tag"]] == "production"
    assert not list(registry.registry_dir().glob(f".{name}.json.*.tmp"))


def test_code_revision_names_a_commit_or_the_version(tmp_path):
    revision = registry.code_revision()
    assert len(revision.split("-")[0]) == 40 or revision.startswith("defectflow ")
    assert registry.code_revision(tmp_path).startswith("defectflow ")  # not a git checkout


if __name__ == "__main__":
    home, first, second, out = (Path(a) for a in sys.argv[1:5])
    out.write_text(json.dumps(_scenario(home, first, second), indent=2))
