"""What users serve by default, made once per test session: a model trained by the real
pipeline (`defectflow train`: validation, tuning, training, calibration, the anomaly head,
TFLite export, gate, Bento), and a clean interpreter that sees only a Bento's own `src/` and
the installed third-party packages.

The pipeline runs on the tiny synthetic dataset with configs/tiny.yaml (about 45 s on 2
cores); its answers are not good, but they come out of the same code path as production's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, replace
from pathlib import Path

from helpers_processes import BIN, isolated_env

_DERIVE = """
import json, shutil, sys
from pathlib import Path
from defectflow.environment import configure_environment
configure_environment()
from defectflow import registry
source, target, repo, name, changes = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5]
shutil.copytree(source, target)
info = json.loads((target / "model.json").read_text())
info.update(json.loads(changes))
(target / "model.json").write_text(json.dumps(info, indent=2))
tag = registry.save_model(target, name, {"metrics": {"accuracy": 0.0}})
print(tag, registry.build_bento(tag, repo / "bentofile.yaml", repo))
"""
#: The pipeline's model with the classifier's P(defect) threshold at 1.0: every image is "good"
#: to the classifier, so its anomaly head alone makes an answer `unknown_defect` (same weights,
#: same TFLite file, same anomaly threshold as chosen on the validation split).
ANOMALY_ONLY = {"defect_threshold": 1.0}


@dataclass(frozen=True)
class PipelineModel:
    """The pipeline's outputs, in a DEFECTFLOW_HOME of their own (`env` points at it)."""

    home: Path
    env: dict[str, str]
    run_dir: Path
    model_dir: Path
    model_tag: str
    bento_tag: str
    #: The same model, answered by its anomaly head alone (ANOMALY_ONLY).
    anomaly_only_bento_tag: str

    def bento_dir(self, tag: str | None = None) -> Path:
        name, version = (tag or self.bento_tag).split(":")
        return self.home / "bentoml" / "bentos" / name / version

    @property
    def info(self) -> dict:
        return json.loads((self.model_dir / "model.json").read_text())


def train_pipeline_model(
    root: Path, dataset: Path, repo: Path, prefect_api_url: str | None = None
) -> PipelineModel:
    """Run `defectflow train --config tiny` on `dataset` into `root/home`; export.serve=tflite
    makes the TFLite choice explicit (auto picks it only when it measured it faster). With
    `prefect_api_url` its flow runs on that Prefect server, else on a temporary one of its own."""
    home = root / "home"
    env = isolated_env(home)
    train_env = {**env, "PREFECT_API_URL": prefect_api_url} if prefect_api_url else env
    command = [
        str(BIN / "defectflow"),
        "train",
        "--config",
        "tiny",
        "--run-id",
        "pipeline",
        f"data.root={dataset}",
        "tune.max_trials=1",
        "tune.epochs=1",
        "export.serve=tflite",
    ]
    start = time.monotonic()
    log = root / "pipeline-train.log"
    with log.open("wb") as out:
        done = subprocess.run(
            command, env=train_env, cwd=root, stdout=out, stderr=subprocess.STDOUT, timeout=900
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"the pipeline failed (exit {done.returncode}):\n{log.read_text()[-4000:]}"
        )
    run_dir = home / "runs" / "pipeline"
    package = json.loads((run_dir / "package.json").read_text())
    model = PipelineModel(
        home=home,
        env=env,
        run_dir=run_dir,
        model_dir=run_dir / "model",
        model_tag=package["model_tag"],
        bento_tag=package["bento_tag"],
        anomaly_only_bento_tag="",
    )
    _, anomaly_only = derive_bento(model, root / "anomaly-only", "anomalyonly", ANOMALY_ONLY, repo)
    print(
        f"\npipeline model {package['model_tag']} and its Bentos in {time.monotonic() - start:.0f} s"
    )
    return replace(model, anomaly_only_bento_tag=anomaly_only)


def derive_bento(
    model: PipelineModel, target: Path, name: str, changes: dict, repo: Path
) -> tuple[str, str]:
    """Save a copy of the pipeline's model with `changes` to its model.json under `name`, build
    its Bento in the same store; returns (model tag, Bento tag)."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _DERIVE,
            str(model.model_dir),
            str(target),
            str(repo),
            name,
            json.dumps(changes),
        ],
        env=model.env,
        cwd=target.parent,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    )
    model_tag, bento_tag = done.stdout.split()[-2:]
    return model_tag, bento_tag


def clean_interpreter(path: Path) -> Path:
    """A venv at `path` whose only addition to the standard library is the test venv's
    site-packages as a plain path: the third-party packages, but not the `.pth` hooks in it
    (the editable install's finder, which would find the whole checkout). Returns its python."""
    if not (path / "bin" / "python").exists():
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120
        )
    purelib = Path(sysconfig.get_paths()["purelib"])
    own = Path(
        subprocess.run(
            [
                str(path / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
    )
    (own / "third_party.pth").write_text(f"{purelib}\n")
    return path / "bin" / "python"
