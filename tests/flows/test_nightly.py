"""The nightly retrain's decision, the form fields of the training pipeline and the registry
flows, on the session's Prefect server (`prefect_api`, tests/conftest.py)."""

from __future__ import annotations

import pytest
from helpers_models import make_tiny_model_dir

from defectflow import registry
from defectflow.config import form_overrides, load_config
from defectflow.data.split import dataset_fingerprint, listing_signature


def test_form_fields_become_overrides_and_free_overrides_win():
    assert form_overrides() == []
    assert form_overrides("/data", 5, False, ["gate.promote=true"]) == [
        "data.root=/data",
        "tune.enabled=true",
        "tune.max_trials=5",
        "gate.promote=false",
        "gate.promote=true",
    ]
    assert form_overrides(tuner_trials=0) == ["tune.enabled=false"]
    cfg = load_config("tiny", form_overrides("/data", 0, False))
    assert (cfg.data.root, cfg.tune.enabled, cfg.gate.promote) == ("/data", False, False)


def test_fingerprint_is_the_split_fingerprint_and_follows_the_bytes(tiny_dataset, tmp_path):
    import shutil

    from defectflow.data.mvtec import scan_dataset
    from defectflow.data.split import split_dataset
    from defectflow.data.validation import image_facts, sha256_by_path

    cfg = load_config("tiny", [f"data.root={tiny_dataset}"])
    samples = scan_dataset(tiny_dataset)
    split = split_dataset(
        samples, sha256_by_path(image_facts(samples)), cfg.data.split, tmp_path / "manifests"
    )
    assert dataset_fingerprint(tiny_dataset, "good", cfg.data.split) == split.fingerprint

    copy = shutil.copytree(tiny_dataset, tmp_path / "copy")
    assert (
        dataset_fingerprint(copy, "good", cfg.data.split) == split.fingerprint
    )  # wherever it lives
    before = listing_signature(copy)
    incoming = tmp_path / "incoming" / "test" / "crack"
    incoming.mkdir(parents=True)
    shutil.copy(next((copy / "test" / "crack").glob("*.png")), incoming / "reviewed.png")
    (incoming.parents[1] / "provenance.jsonl").write_text(
        '{"image": "test/crack/reviewed.png", "label": "crack", "reviewer": "Ann"}\n'
    )
    assert (
        dataset_fingerprint(copy, "good", cfg.data.split, incoming.parents[1]) != split.fingerprint
    )
    image = next((copy / "test" / "crack").glob("*.png"))
    image.write_bytes(image.read_bytes() + b"\0")
    assert listing_signature(copy) != before
    assert dataset_fingerprint(copy, "good", cfg.data.split) != split.fingerprint


@pytest.mark.integration  # runs flows on a Prefect server
def test_nightly_skips_when_production_was_trained_on_this_data(
    prefect_api, tiny_dataset, tmp_path
):
    from defectflow.orchestration.flows.nightly import nightly_retrain

    cfg = load_config("tiny", [f"data.root={tiny_dataset}", "package.model_name=nightlyskip"])
    fingerprint = dataset_fingerprint(tiny_dataset, "good", cfg.data.split)
    tag = registry.save_model(
        make_tiny_model_dir(tmp_path / "m"),
        "nightlyskip",
        {"metrics": {"accuracy": 0.5}, "data_fingerprint": fingerprint},
    )
    registry.promote(tag, reason="test")
    state = nightly_retrain(
        config="tiny",
        data_root=str(tiny_dataset),
        overrides=["package.model_name=nightlyskip"],
        return_state=True,
    )
    assert state.is_completed()
    assert state.message.startswith("skipped: no new data") and tag in state.message
    assert state.result()["skipped"] is True
    assert (
        registry.production_tag("nightlyskip") == tag
        and len(registry.list_models("nightlyskip")) == 1
    )


@pytest.mark.integration  # runs flows on a Prefect server
def test_promote_flow_records_rollback_and_refuses_a_missing_tag(prefect_api, tmp_path):
    from defectflow.orchestration.flows.models import promote

    first, second = (
        registry.save_model(
            make_tiny_model_dir(tmp_path / str(i), seed=i),
            "defectflow",
            {"metrics": {"accuracy": 0.5}},
        )
        for i in range(2)
    )
    for tag in (first, second):
        assert promote(
            action="promote", model=tag, build_bento=False, return_state=True
        ).is_completed()
    state = promote(action="rollback", reason="bad night", build_bento=False, return_state=True)
    assert state.is_completed() and registry.production_tag() == first
    assert registry.history()[-1]["reason"] == "bad night"
    failed = promote(action="promote", model=None, build_bento=False, return_state=True)
    assert failed.is_failed() and registry.production_tag() == first


@pytest.mark.integration  # runs flows on a Prefect server
def test_evaluate_flow_publishes_metrics_beside_production(prefect_api, tiny_dataset, tmp_path):
    from defectflow.orchestration.flows.models import evaluate
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    first, second = (
        registry.save_model(
            make_tiny_model_dir(tmp_path / str(i), seed=i),
            "defectflow",
            {"metrics": {"accuracy": 0.5}},
        )
        for i in range(2)
    )
    registry.promote(first, reason="test")
    state = evaluate(model=second, data_root=str(tiny_dataset), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert (
        result["model"] == second
        and result["stage"] == "candidate"
        and result["production"] == first
    )
    assert set(result["metrics"]) >= {"accuracy", "presence_accuracy", "defect_dice"}
    assert result["production_metrics"] and result["gate"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    assert {"evaluation-report", "metrics-comparison"} <= {a.key for a in artifacts}
    assert registry.production_tag() == first  # read-only on the registry

    missing = evaluate(model="defectflow:doesnotexist", return_state=True)
    assert missing.is_failed()


@pytest.mark.integration  # runs flows on a Prefect server
def test_nightly_publishes_the_drift_of_production_answers(prefect_api, tiny_dataset, tmp_path):
    from pathlib import Path

    from defectflow.orchestration.flows.nightly import nightly_retrain
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from defectflow.data.mvtec import scan_dataset
    from defectflow.data.split import SplitSample, write_manifest
    from defectflow.serving.settings import json_log_line, prediction_record

    cfg = load_config("tiny", [f"data.root={tiny_dataset}"])
    run = tmp_path / "run"  # the production model's run folder: its split manifest
    samples = scan_dataset(tiny_dataset)
    write_manifest([SplitSample(s, "val") for s in samples[::3]], run / "manifest.csv")
    tag = registry.save_model(
        make_tiny_model_dir(tmp_path / "m"),
        "nightlydrift",
        {
            "metrics": {"accuracy": 0.5},
            "data_fingerprint": dataset_fingerprint(tiny_dataset, "good", cfg.data.split),
            "run_dir": str(run),
        },
    )
    registry.promote(tag, reason="test")
    log = tmp_path / "predictions.jsonl"
    answer = {"class": "crack", "confidence": 0.9, "status": "accepted", "probabilities": {}}
    log.write_text(
        "".join(
            json_log_line(prediction_record(f"r{i}", "/predict", tag, 0.0, None, answer, 200))
            + "\n"
            for i in range(60)
        )
    )
    state = nightly_retrain(
        config="tiny",
        data_root=str(tiny_dataset),
        overrides=["package.model_name=nightlydrift", f"serve.prediction_log={log}"],
        return_state=True,
    )
    assert state.is_completed(), state.message
    assert state.message.startswith("skipped: no new data") and "drift check: " in state.message
    drift = state.result()["drift"]
    assert drift["answers"] == 60
    assert set(drift["checks"]) == {"class mix", "anomaly score", "uncertain rate"}
    assert drift["checks"]["anomaly score"] == "not available"  # the tiny model has no anomaly head
    page = Path(drift["page"])
    assert page.name == "drift.html" and (page.parent / "drift.png").is_file()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    by_key = {a.key: a for a in artifacts}
    assert {"drift", "drift-checks"} <= set(by_key)
    assert f"Compared: 60 answers of production model `{tag}`" in by_key["drift"].data
    assert "validation images of" in by_key["drift"].data
