"""The training flow for real: Prefect, Great Expectations, KerasTuner, Keras, BentoML and HTTP."""

import base64
import json
import os
import shutil
import socket
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from helpers_processes import BIN, free_port, running, wait_http

pytestmark = pytest.mark.integration

TINY = ["tune.max_trials=1", "tune.epochs=1", "train.epochs=1"]


def _post(url: str, filename: str, data: bytes) -> tuple[int, dict]:
    response = httpx.post(f"{url}/predict", files={"image": (filename, data)}, timeout=60)
    return response.status_code, response.json()


def test_flow_trains_packages_and_serves(prefect_api, tiny_dataset, tmp_path):
    from defectflow.orchestration.flows.training import training_pipeline

    summary = training_pipeline(
        config="tiny",
        overrides=[f"data.root={tiny_dataset}", *TINY, "package.model_name=servetest"],
    )
    run_dir = Path(summary["run_dir"])
    for name in (
        "config.yaml",
        "manifest.csv",
        "augmentation_preview.png",
        "trials.json",
        "calibration.json",
        "training_curves.png",
        "gate.json",
        "package.json",
        "export.json",
        "report/report.html",
        "report/report.md",
    ):
        assert (run_dir / name).exists(), name
    export = json.loads((run_dir / "export.json").read_text())
    assert export["parity"]["passed"] and export["parity"]["n_images"] > 0  # on the test split
    assert summary["serving_format"] == export["format"]
    assert (run_dir / "validation" / "data_docs" / "index.html").exists()
    assert (run_dir / "evaluation" / "confusion_matrix.png").exists()
    assert set(summary["metrics"]) >= {
        "accuracy",
        "presence_accuracy",
        "defect_accuracy",
        "defect_dice",
    }
    assert summary["model_tag"].startswith("servetest:")
    assert (
        summary["promoted"] and summary["bento_tag"]
    )  # the first model of its name: floors alone decide

    import bentoml

    model = bentoml.models.get(summary["model_tag"])
    assert model.info.metadata["metrics"]["accuracy"] == pytest.approx(
        summary["metrics"]["accuracy"]
    )
    assert "config_sha256" in model.info.metadata
    # The anomaly head was fitted on the good training images and its threshold chosen on validation.
    info = json.loads((Path(summary["model_dir"]) / "model.json").read_text())
    assert info["anomaly"]["train_images"] > 0 and info["anomaly_threshold"] > 0
    assert model.info.metadata["anomaly"]["threshold"] == pytest.approx(info["anomaly_threshold"])
    assert "anomaly_auroc" in model.info.metadata["evaluation"]

    # Through the CLI, as `make demo` does: it must become the server, so stopping it leaves
    # nothing listening.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(BIN / "defectflow"),
        "serve",
        "--bento",
        summary["bento_tag"],
        "--port",
        str(port),
    ]
    with running(command, os.environ.copy(), tmp_path / "serve.log") as server:
        wait_http(f"{url}/readyz", server, 180, tmp_path / "serve.log")
        image_path = next((tiny_dataset / "test" / "crack").iterdir())
        status, body = _post(url, image_path.name, image_path.read_bytes())
        assert status == 200, body
        assert body["class"] in [
            "good",
            "crack",
            "faulty_imprint",
            "poke",
            "scratch",
            "squeeze",
            "unknown_defect",
        ]
        assert body["anomaly_threshold"] == pytest.approx(info["anomaly_threshold"], abs=1e-6)
        assert abs(sum(body["probabilities"].values()) - 1.0) < 1e-4
        mask = cv2.imdecode(
            np.frombuffer(base64.b64decode(body["mask_png_base64"]), np.uint8), cv2.IMREAD_UNCHANGED
        )
        assert mask.shape == cv2.imread(str(image_path)).shape[:2]
        status, body = _post(url, "notes.txt", b"this is not an image")
        assert 400 <= status < 500, body
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # free again: no orphaned server


def test_champion_and_challenger_on_the_same_split(prefect_api, tiny_dataset):
    import bentoml
    from defectflow.orchestration.flows.training import training_pipeline

    from defectflow import registry

    overrides = [
        f"data.root={tiny_dataset}",
        *TINY,
        "package.model_name=gatetest",
        "package.build_bento=false",
    ]
    first = training_pipeline(config="tiny", overrides=overrides)
    assert first["promoted"] and first["champion"] is None
    assert registry.production_tag("gatetest") == first["model_tag"]
    metadata = bentoml.models.get(first["model_tag"]).info.metadata
    for key in (
        "metrics",
        "config",
        "data_fingerprint",
        "manifest_sha256",
        "code_revision",
        "training_seconds",
        "files",
        "gate",
    ):
        assert metadata.get(key) is not None, key
    assert metadata.get("parent") is None
    assert metadata["data_fingerprint"] == first["data_fingerprint"]
    assert metadata["config"]["package"]["model_name"] == "gatetest"
    assert "no production model yet" in metadata["gate"]["message"]

    # A challenger that must beat the champion by a full point cannot: rejected, yet Completed.
    state = training_pipeline(
        config="tiny", overrides=[*overrides, "gate.tolerance.accuracy=-1.0"], return_state=True
    )
    assert state.is_completed()
    assert state.message.startswith("not promoted: accuracy") and "champion" in state.message
    second = state.result()
    assert not second["promoted"] and second["champion"] == first["model_tag"]
    assert registry.production_tag("gatetest") == first["model_tag"]  # production untouched
    assert registry.stage_of(second["model_tag"]) == "candidate"
    rejected = bentoml.models.get(second["model_tag"]).info.metadata
    assert rejected["parent"] == first["model_tag"] and rejected["gate"]["passed"] is False

    # The champion was re-evaluated in this run, on this run's test split.
    run_dir = Path(second["run_dir"])
    champion_metrics = json.loads((run_dir / "champion_evaluation" / "metrics.json").read_text())
    challenger_metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    assert champion_metrics["n_images"] == challenger_metrics["n_images"]
    gate = json.loads((run_dir / "gate.json").read_text())
    champion_checks = [c for c in gate["checks"] if c["kind"] == "champion"]
    assert {c["metric"]: c["champion_value"] for c in champion_checks} == {
        k: pytest.approx(champion_metrics[k])
        for k in ("accuracy", "presence_accuracy", "defect_dice")
    }


def test_flow_stops_on_invalid_data(prefect_api, tiny_dataset, tmp_path):
    from defectflow.orchestration.flows.training import training_pipeline

    from defectflow.data.validation import DataValidationError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    (broken / "test" / "scratch" / "000.png").write_bytes(b"truncated")
    with pytest.raises(DataValidationError, match="scratch/000.png"):
        training_pipeline(config="tiny", overrides=[f"data.root={broken}", *TINY])


def _as_overrides(node, prefix=""):
    """A config file's values as `key=value` overrides."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _as_overrides(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}={str(value).lower() if isinstance(value, bool) else value}"


def test_reproduce_tunes_once_and_summarizes_every_seed(prefect_api, tiny_dataset, tmp_path):
    import inspect

    from defectflow.orchestration.flows.reproduce import STUDY_MODEL_NAME, reproduce
    from omegaconf import OmegaConf

    from defectflow.config import config_dir, from_yaml

    # No named config: the default recipe every category gets, with the data from data.root
    # alone; tiny's budget comes as overrides so that this stays a seconds-long run.
    assert inspect.signature(reproduce.fn).parameters["config"].default == "default"
    tiny = OmegaConf.to_container(OmegaConf.load(config_dir() / "tiny.yaml"))
    out = tmp_path / "results"
    summary = reproduce(
        seeds=[1, 2],
        overrides=[f"data.root={tiny_dataset}", *_as_overrides(tiny)],
        out_dir=str(out),
    )
    assert [run["seed"] for run in summary["runs"]] == [1, 2]
    assert summary["tuned"] == {"base_filters": 4}  # configs/tuner/tiny.yaml's one value
    first, second = (Path(run["run_dir"]) for run in summary["runs"])
    assert (first / "trials.csv").exists() and not (second / "trials.csv").exists()  # tuned once
    assert from_yaml((second / "config.yaml").read_text()).tune.enabled is False
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"]["accuracy"]["values"] == [
        r["metrics"]["accuracy"] for r in summary["runs"]
    ]
    assert len(saved["summary"]["coverage"]["values"]) == 2
    # The wall time of every stage, per seed, as each run folder's stage_times.json has it.
    pipeline = ["load-config", "fingerprint-data", "scan-data", "split-data", "validate-data"]
    pipeline += ["augment-data", "tune-hyperparameters", "train-model", "fit-anomaly-head"]
    pipeline += ["calibrate-thresholds", "export-compact-model", "guard-test-set"]
    pipeline += ["evaluate-model", "evaluate-champion", "gate", "register-model"]
    pipeline += ["promote-model", "write-report"]
    for run, run_dir in zip(saved["runs"], (first, second), strict=True):
        assert list(run["stage_seconds"]) == pipeline
        times = json.loads((run_dir / "stage_times.json").read_text())
        assert times["stage_seconds"] == run["stage_seconds"]
        assert 0 < sum(run["stage_seconds"].values()) <= run["wall_seconds"] + 0.01  # rounding
        assert run["stage_seconds"]["train-model"] > 0
        # Graded on its whole test split: a study's models are no production model's challengers.
        assert json.loads((run_dir / "gate.json").read_text())["champion"] is None
        assert json.loads((run_dir / "test_set.json").read_text())["leaked"] == {}
        assert from_yaml((run_dir / "config.yaml").read_text()).package.model_name == (
            STUDY_MODEL_NAME
        )
    table = (out / "results.md").read_text()
    assert "mean ± std (n=2)" in table and "| train-model |" in table
    assert "answers accepted without review (coverage)" in table


def test_a_run_id_resumes_and_refuses_another_config(prefect_api, tiny_dataset):
    from defectflow.orchestration.flows.training import training_pipeline

    from defectflow.orchestration.runs import RunConflict

    overrides = [f"data.root={tiny_dataset}", *TINY, "package.build_bento=false"]
    first = training_pipeline(config="tiny", overrides=overrides, run_id="resume-me")
    again = training_pipeline(config="tiny", overrides=overrides, run_id="resume-me")
    assert first["run_dir"] == again["run_dir"]
    training = json.loads((Path(again["run_dir"]) / "model" / "training.json").read_text())
    assert (
        training["resumed_from_epoch"] == 1 and training["epochs_trained"] == 0
    )  # nothing trained twice
    assert len(training["history"]["loss"]) == 1
    with pytest.raises(RunConflict):
        training_pipeline(
            config="tiny", overrides=[*overrides, "train.epochs=2"], run_id="resume-me"
        )


def test_cli_evaluates_a_finished_run_again(prefect_api, tiny_dataset, tmp_path, capsys):
    from defectflow.orchestration.flows.training import training_pipeline

    from defectflow.artifacts import ModelInfo
    from defectflow.cli import main

    run_dir = Path(
        training_pipeline(
            config="tiny",
            overrides=[
                f"data.root={tiny_dataset}",
                *TINY,
                "package.build_bento=false",
                "eval.calibrate=false",
            ],
        )["run_dir"]
    )
    assert ModelInfo.load(run_dir / "model").defect_threshold is None  # calibration was off
    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "P(defect)" in out and "\naccuracy " in out
    assert (run_dir / "report" / "report.html").exists()
    assert ModelInfo.load(run_dir / "model").defect_threshold is not None
    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    assert metrics == json.loads((run_dir / "model" / "metrics.json").read_text())
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a finished run folder" in capsys.readouterr().err


def test_cli_evaluates_a_stored_model_without_touching_the_registry(
    prefect_api, tiny_dataset, tmp_path, capsys
):
    from defectflow.orchestration.flows.training import training_pipeline

    from defectflow import registry
    from defectflow.cli import main

    summary = training_pipeline(
        config="tiny", overrides=[f"data.root={tiny_dataset}", *TINY, "package.build_bento=false"]
    )
    tag = summary["model_tag"]
    book = registry.registry_dir() / "defectflow.json"
    before = (book.read_bytes(), registry.file_digests(registry.model_dir(tag)))
    capsys.readouterr()
    assert main(["evaluate", "--model", tag, "--json", "--out", str(tmp_path / "report")]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["model"] == tag and answer["n_images"] == summary_n_images(summary)
    assert answer["metrics"] == pytest.approx(
        summary["metrics"], nan_ok=True
    )  # same split, same figures
    assert (tmp_path / "report" / "report.html").exists()
    assert (book.read_bytes(), registry.file_digests(registry.model_dir(tag))) == before

    # Bad input: one clear line, non-zero exit, registry unchanged.
    other = tmp_path / "other"
    shutil.copytree(tiny_dataset, other)
    shutil.copytree(other / "test" / "poke", other / "test" / "dent")
    assert main(["evaluate", "--model", tag, f"data.root={other}"]) == 2
    assert "predicts good, crack" in capsys.readouterr().err
    assert main(["evaluate", "--model", "defectflow:nosuchversion"]) == 2
    assert "is not in the BentoML model store" in capsys.readouterr().err
    copy = tmp_path / "copy"
    shutil.copytree(registry.model_dir(tag), copy, ignore=shutil.ignore_patterns("model.yaml"))
    damaged = registry.save_model(copy, "damagedtest", registry.model_metadata(tag))
    (registry.model_dir(damaged) / "model.keras").write_bytes(b"not a model")
    assert main(["evaluate", "--model", damaged]) == 2
    err = capsys.readouterr().err.strip()
    assert "damaged" in err and len(err.splitlines()) == 1
    assert main(["models", "promote", damaged]) == 2
    assert (book.read_bytes(), registry.file_digests(registry.model_dir(tag))) == before


def summary_n_images(summary: dict) -> int:
    return json.loads((Path(summary["run_dir"]) / "evaluation" / "metrics.json").read_text())[
        "n_images"
    ]
