"""`defectflow models` (defectflow.cli.models)."""

from defectflow.cli import main


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
