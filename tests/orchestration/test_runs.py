import pytest

from defectflow.config import load_config
from defectflow.orchestration.runs import RunConflict, open_run_dir


def test_run_ids_name_folders_and_reopen_for_resume(tmp_path):
    cfg = load_config("tiny", [f"paths.runs={tmp_path}"])
    first, resumed = open_run_dir(cfg)
    assert not resumed and (first / "config.yaml").exists()
    named, resumed = open_run_dir(cfg, "nightly-1")
    assert named.name == "nightly-1" and not resumed
    again, resumed = open_run_dir(cfg, "nightly-1")
    assert again == named and resumed


def test_a_run_id_reused_with_another_config_is_refused(tmp_path):
    open_run_dir(load_config("tiny", [f"paths.runs={tmp_path}"]), "r1")
    with pytest.raises(RunConflict, match="another configuration"):
        open_run_dir(load_config("tiny", [f"paths.runs={tmp_path}", "train.epochs=7"]), "r1")


@pytest.mark.parametrize("bad", ["../escape", "a/b", " x", "-lead", "x" * 101])
def test_unsafe_run_ids_are_refused(tmp_path, bad):
    cfg = load_config("tiny", [f"paths.runs={tmp_path}"])
    with pytest.raises(ValueError, match="run id"):
        open_run_dir(cfg, bad)


def test_new_runs_never_share_a_folder_even_with_the_same_id(tmp_path, monkeypatch):
    """Two workers starting runs in the same second on one data dir: the second run does not
    resume the first one's folder (same config), it claims another id."""
    from defectflow.orchestration import runs

    ids = iter(["20260101-000000-aaaa", "20260101-000000-aaaa", "20260101-000000-bbbb"])
    monkeypatch.setattr(runs, "new_run_id", lambda: next(ids))
    cfg = load_config("tiny", [f"paths.runs={tmp_path}"])
    first, first_resumed = open_run_dir(cfg)
    second, second_resumed = open_run_dir(cfg)
    assert first.name == "20260101-000000-aaaa" and second.name == "20260101-000000-bbbb"
    assert not first_resumed and not second_resumed
