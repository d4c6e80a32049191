"""`defectflow data synth`, `data preview`, `validate` (defectflow.cli.data)."""

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
