import pytest

from defectflow.cli import main


def test_synth_then_validate(tmp_path, capsys):
    out = tmp_path / "synth"
    overrides = [
        f"data.synth.out={out}",
        "data.synth.image_size=64",
        "data.synth.n_train_good=6",
        "data.synth.n_test_good=3",
        "data.synth.n_per_defect=3",
    ]
    assert main(["data", "synth", *overrides]) == 0
    assert (out / "test" / "crack").is_dir()
    assert main(["data", "synth", *overrides]) == 0
    assert "already" in capsys.readouterr().out
    assert main(["data", "synth", "--overwrite", *overrides]) == 0
    assert main(["validate", f"data.root={out}"]) == 0
    assert "passed" in capsys.readouterr().out.lower()


def test_validate_reports_bad_data(tmp_path, capsys):
    out = tmp_path / "synth"
    overrides = [f"data.synth.out={out}", "data.synth.image_size=64", "data.synth.n_per_defect=3"]
    assert main(["data", "synth", *overrides]) == 0
    next((out / "ground_truth" / "poke").iterdir()).unlink()
    assert main(["validate", f"data.root={out}"]) == 1
    assert "poke" in capsys.readouterr().err


def test_clear_errors_for_bad_config_and_missing_data(tmp_path, capsys):
    assert main(["validate", "train.epochs=abc"]) == 2
    assert "invalid configuration" in capsys.readouterr().err
    assert main(["validate", f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--config", "nope"]) == 2
    assert "unknown config" in capsys.readouterr().err


def test_usage_error_exits_nonzero():
    with pytest.raises(SystemExit):
        main(["bogus"])


def test_data_preview_writes_a_grid(tiny_dataset, tmp_path, capsys):
    import cv2

    out = tmp_path / "preview.png"
    assert (
        main(
            [
                "data",
                "preview",
                "--out",
                str(out),
                f"data.root={tiny_dataset}",
                "model.input_size=64",
                "augment.preview_count=6",
            ]
        )
        == 0
    )
    image = cv2.imread(str(out))
    assert (
        image is not None and image.shape[1] >= 4 * 160 and image.shape[0] >= 2 * 160
    )  # 6 tiles, 4 a row
    assert str(out) in capsys.readouterr().out


def test_serve_refuses_a_busy_port(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert "cannot serve" in capsys.readouterr().err


def test_models_commands_list_show_promote_rollback_archive(tmp_path, capsys):
    import json
    import uuid

    from helpers_models import make_tiny_model_dir

    from defectflow import registry

    name = f"cli{uuid.uuid4().hex[:8]}"
    gate = {"message": "promoted: accuracy 0.9 >= minimum 0.5", "passed": True}
    a, b = (
        registry.save_model(
            make_tiny_model_dir(tmp_path / str(i), seed=i),
            name,
            {"metrics": {"accuracy": 0.5 + i / 10}, "gate": gate},
        )
        for i in range(2)
    )
    capsys.readouterr()
    assert main(["models", "list", "--name", name]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["tag", "stage", "created"]
    assert a in out and b in out and "production" not in out

    assert main(["models", "promote", a]) == 0
    assert main(["models", "promote", b, "--reason", "better on line 3"]) == 0
    assert f"{b} is production (previous: {a})" in capsys.readouterr().out
    assert main(["models", "list", "--name", name, "--json"]) == 0
    assert {r["tag"]: r["stage"] for r in json.loads(capsys.readouterr().out)} == {
        a: "archived",
        b: "production",
    }

    assert main(["models", "show", b]) == 0
    out = capsys.readouterr().out
    assert (
        "production" in out
        and "complete" in out
        and "model.keras" in out
        and "promoted: accuracy" in out
    )
    assert main(["models", "show", b, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["stage"] == "production" and shown["files"]["model.json"] > 0

    assert main(["models", "archive", b]) == 2
    assert "is the production model" in capsys.readouterr().err
    assert main(["models", "rollback", "--name", name]) == 0
    assert f"{a} is production again; {b} archived" in capsys.readouterr().out
    assert main(["models", "rollback", "--name", name]) == 2
    assert "no earlier production model" in capsys.readouterr().err
    assert main(["models", "history", "--name", name]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines()[2:]] == ["promote", "promote", "rollback"]
    assert "better on line 3" in out
    assert main(["models", "show", f"{name}:nosuchversion"]) == 2
    assert "is not in the BentoML model store" in capsys.readouterr().err
    assert registry.production_tag(name) == a
