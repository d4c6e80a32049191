"""`defectflow predict`: files, folders and globs through a model, report, PNGs, summary, --score."""

import csv
import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers_models import make_tiny_model_dir
from helpers_processes import BIN

from defectflow.cli import main
from defectflow.data.mvtec import scan_dataset
from defectflow.evaluation.evaluate import evaluate
from defectflow.inference.inspection import collect_inputs
from defectflow.inference.predictor import Predictor


@pytest.fixture()
def folder(tmp_path, tiny_dataset):
    """The tiny MVTec-layout set plus a corrupt PNG, a text file and a nested sub-folder."""
    root = tmp_path / "line3"
    shutil.copytree(tiny_dataset, root)
    (root / "test" / "good" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / "notes.txt").write_text("shift 2, camera B\n")
    nested = root / "extra" / "nested"
    nested.mkdir(parents=True)
    shutil.copy(next((tiny_dataset / "test" / "crack").glob("*.png")), nested / "part.png")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("model") / "model")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_collect_inputs_walks_folders_expands_globs_and_reports_what_is_missing(folder):
    inputs = collect_inputs(
        [str(folder), str(folder / "test" / "crack" / "*.png"), str(folder / "nowhere")]
    )
    paths = [f.path for f in inputs.files]
    assert len(paths) == len(
        set(p.resolve() for p in paths)
    )  # the crack images, found twice, are listed once
    assert folder / "notes.txt" in paths and folder / "extra" / "nested" / "part.png" in paths
    nested = next(f for f in inputs.files if f.path.name == "part.png")
    assert str(nested.relative) == "line3/extra/nested/part.png"
    assert inputs.missing == [str(folder / "nowhere")]


def test_collect_inputs_mirrors_each_input_below_the_common_parent(tmp_path, monkeypatch):
    for name in (
        "a/001.png",
        "b/001.png",
        "x/imgs/1.png",
        "y/imgs/1.png",
        "c/001.png",
        "c/001.jpg",
        "c/001.jpg.png",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")

    def outputs(*arguments):
        return {str(f.relative): str(f.output_stem) for f in collect_inputs(arguments).files}

    assert outputs(str(tmp_path / "a" / "001.png")) == {"001.png": "001"}
    assert outputs(str(tmp_path / "*" / "001.png")) == {
        "a/001.png": "a/001",
        "b/001.png": "b/001",
        "c/001.png": "c/001",
    }
    assert outputs(str(tmp_path / "x" / "imgs"), str(tmp_path / "y" / "imgs")) == {
        "x/imgs/1.png": "x/imgs/1",
        "y/imgs/1.png": "y/imgs/1",
    }
    # Stems that would clash keep the suffix, and a suffix kept may clash anew (001.jpg.png).
    assert outputs(str(tmp_path / "c")) == {
        "c/001.png": "c/001.png",
        "c/001.jpg": "c/001.jpg",
        "c/001.jpg.png": "c/001.jpg.png",
    }
    # Relative arguments and `..` are mirrored by where they lead, not by how they are spelt.
    monkeypatch.chdir(tmp_path / "a")
    assert outputs("001.png", "../b/001.png") == {"a/001.png": "a/001", "b/001.png": "b/001"}


def _two_images_named_001(root):
    """a/001.png and b/001.png: different content, and different sizes, so each output shows
    which input it came from."""
    rng = np.random.default_rng(1)
    shapes = {"a": (40, 56, 3), "b": (48, 32, 3)}
    for folder, shape in shapes.items():
        (root / folder).mkdir(parents=True)
        cv2.imwrite(str(root / folder / "001.png"), rng.integers(0, 256, shape, dtype=np.uint8))
    return shapes


def _check_distinct_outputs(rows, out, shapes):
    assert len(rows) == 2
    for row in rows:
        assert row["class"] != "error", row
    for kind in ("mask", "overlay"):
        written = [row[kind] for row in rows]
        assert len(set(written)) == 2 and all(os.path.isfile(path) for path in written), written
    for row in rows:
        folder = os.path.basename(os.path.dirname(row["path"]))
        shape = shapes[folder]
        assert row["mask"] == str(out / folder / "001_mask.png")
        assert row["overlay"] == str(out / folder / "001_overlay.png")
        assert cv2.imread(row["mask"], cv2.IMREAD_UNCHANGED).shape == shape[:2]
        assert cv2.imread(row["overlay"]).shape == shape


def test_predict_keeps_same_named_files_of_a_glob_apart(tmp_path, model_dir):
    shapes = _two_images_named_001(tmp_path / "in")
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                str(tmp_path / "in" / "*" / "001.png"),
                "--model",
                str(model_dir),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    _check_distinct_outputs(_rows(out / "report.csv"), out, shapes)


def test_predict_keeps_same_named_file_arguments_apart(tmp_path, model_dir):
    shapes = _two_images_named_001(tmp_path / "in")
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                str(tmp_path / "in" / "a" / "001.png"),
                str(tmp_path / "in" / "b" / "001.png"),
                "--model",
                str(model_dir),
                "--out",
                str(out),
                "--format",
                "json",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    _check_distinct_outputs(rows, out, shapes)


def test_predict_writes_a_row_per_file_masks_overlays_and_a_summary(
    folder, model_dir, tmp_path, capsys
):
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                str(folder),
                "--model",
                str(model_dir),
                "--out",
                str(out),
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    rows = _rows(out / "report.csv")
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in files)
    by_name = {os.path.relpath(r["path"], folder): r for r in rows}
    unreadable = (
        "test/good/corrupt.png",
        "notes.txt",
        "license.txt",
    )  # the data set ships its licence
    for bad in unreadable:
        assert by_name[bad]["class"] == "error" and "InvalidImageError" in by_name[bad]["error"]
        assert by_name[bad]["mask"] == ""
    good_rows = [r for r in rows if r["class"] != "error"]
    assert len(good_rows) == len(files) - len(unreadable)
    for row in good_rows:
        probabilities = [float(row[f"p_{c}"]) for c in Predictor.load(model_dir).classes]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert (
            row["is_defective"] in ("True", "False")
            and 0.0 <= float(row["defect_area_fraction"]) <= 1.0
        )
    # Masks and overlays mirror the input tree, at each image's own size.
    part = by_name["extra/nested/part.png"]
    assert part["mask"] == str(out / "line3" / "extra" / "nested" / "part_mask.png")
    mask = cv2.imread(part["mask"], cv2.IMREAD_UNCHANGED)
    assert mask.shape == cv2.imread(part["path"]).shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert cv2.imread(part["overlay"]).shape == cv2.imread(part["path"]).shape
    printed = capsys.readouterr().out
    assert f"{len(good_rows)} of {len(files)} files inspected" in printed
    assert (
        "not inspected: 3 files" in printed and "notes.txt" in printed and "defective:" in printed
    )


def test_predict_json_lines_without_overlays(folder, model_dir, tmp_path):
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                str(folder / "test" / "crack"),
                "--model",
                str(model_dir),
                "--out",
                str(out),
                "--format",
                "json",
                "--no-overlay",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert len(lines) == len(list((folder / "test" / "crack").glob("*.png")))
    assert all(line["mask"] and not line["overlay"] and line["error"] == "" for line in lines)
    assert not list(out.rglob("*_overlay.png"))


def test_predict_exit_codes(folder, model_dir, tmp_path, capsys):
    only_text = tmp_path / "text"
    only_text.mkdir()
    (only_text / "a.txt").write_text("no image here")
    assert (
        main(["predict", str(only_text), "--model", str(model_dir), "--out", str(tmp_path / "o1")])
        == 1
    )
    assert _rows(tmp_path / "o1" / "report.csv")[0]["class"] == "error"
    assert (
        main(["predict", str(folder), "--model", "nosuchmodel:v1", "--out", str(tmp_path / "o2")])
        == 2
    )
    assert "nosuchmodel" in capsys.readouterr().err


def test_score_equals_defectflow_evaluate_on_the_same_images(folder, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(["predict", str(folder), "--model", str(model_dir), "--out", str(out), "--score"]) == 0
    )
    scored = json.loads((out / "score" / "metrics.json").read_text())
    samples = [
        s for s in scan_dataset(folder) if s.path.name != "corrupt.png"
    ]  # the images it could read
    expected = evaluate(Predictor.load(model_dir), samples, 8).metrics
    assert scored["n_images"] == len(samples)
    for key in ("accuracy", "presence_accuracy", "defect_accuracy", "defect_dice", "auroc", "dice"):
        assert scored[key] == pytest.approx(expected[key], abs=1e-9), key
    assert "scored against the folder labels" in capsys.readouterr().out
    assert main(["predict", str(folder / "extra"), "--model", str(model_dir), "--score"]) == 2


def _sigint_as_from_a_terminal() -> None:
    """A shell gives a foreground command SIGINT at its default, unblocked. A test process may
    hold it otherwise (a pytest-xdist worker once did), and a child inherits an ignored or
    blocked signal across exec: this CLI would then rightly not stop on Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.parametrize("thread", ["main", "another"])
def test_ctrl_c_leaves_a_valid_report_of_what_was_done(model_dir, tmp_path, thread):
    """The last PATH is a named pipe nobody writes to: reading it blocks, so SIGINT always
    arrives mid-run, after the 40 images before it (batch 1: each written before the next).
    A Ctrl-C may reach any thread of the process (TensorFlow starts many): with `another`, it
    goes to one that is not the main thread (CI once hung 60 s that way)."""
    many = tmp_path / "many"
    many.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        cv2.imwrite(str(many / f"{i:03d}.png"), rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    stuck = tmp_path / "camera.png"
    os.mkfifo(stuck)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            str(BIN / "defectflow"),
            "predict",
            str(many),
            str(stuck),
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--batch-size",
            "1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_as_from_a_terminal,
    )
    report = out / "report.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if report.exists() and len(report.read_text().splitlines()) == 41:  # header + 40 rows
            break
        time.sleep(0.05)
    time.sleep(0.2)  # now blocked on the pipe
    if thread == "main":
        proc.send_signal(signal.SIGINT)
    else:
        others = sorted(
            int(tid) for tid in os.listdir(f"/proc/{proc.pid}/task") if int(tid) != proc.pid
        )
        assert others, "the process has one thread"
        assert ctypes.CDLL(None, use_errno=True).tgkill(proc.pid, others[-1], signal.SIGINT) == 0
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        proc.kill()
        signals = [line for line in status.splitlines() if line.startswith("Sig")]
        pytest.fail(f"no exit 60 s after SIGINT; the process's signal state: {signals}")
    assert proc.returncode == 130, stderr[-2000:]
    rows = _rows(report)
    assert len(rows) == 40 and all(r["class"] not in ("", "error") for r in rows)
    assert "interrupted: 40 of 41 files done" in stderr and "40 of 41 files inspected" in stdout
