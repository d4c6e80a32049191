"""The `defectflow` command as a whole (defectflow.cli): every group registered, each command
with its handler, the errors every command shares."""

import argparse
import pkgutil
import subprocess
import sys

import pytest

import defectflow.cli
from defectflow.cli import GROUPS, build_parser, main

#: Every command, as the words that name it; a new command is added here too.
COMMANDS = {
    ("data", "synth"),
    ("data", "preview"),
    ("validate",),
    ("train",),
    ("reproduce",),
    ("evaluate",),
    ("predict",),
    ("models", "list"),
    ("models", "history"),
    ("models", "show"),
    ("models", "promote"),
    ("models", "rollback"),
    ("models", "archive"),
    ("serve",),
    ("review", "list"),
    ("review", "show"),
    ("review", "accept"),
    ("review", "discard"),
    ("up",),
    ("down",),
    ("status",),
    ("deploy",),
}


def _commands(parser: argparse.ArgumentParser, words: tuple = ()):
    """(words, parser) of every command below `parser` that has no subcommands of its own."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield words, parser
        return
    for name, child in subparsers[0].choices.items():
        yield from _commands(child, (*words, name))


def test_every_group_module_is_assembled():
    modules = {m.name for m in pkgutil.iter_modules(defectflow.cli.__path__)}
    assert {g.__name__.rsplit(".", 1)[1] for g in GROUPS} == modules - {"common", "__main__"}


def test_every_command_has_a_handler_in_the_module_that_adds_it():
    assert {words for words, _ in _commands(build_parser())} == COMMANDS
    for group in GROUPS:
        sub = argparse.ArgumentParser().add_subparsers()
        group.add_commands(sub)
        for top, parser in sub.choices.items():
            for words, command in _commands(parser, (top,)):
                handler = command.get_default("handler")
                assert callable(handler), f"defectflow {' '.join(words)} has no handler"
                assert handler.__module__ == group.__name__, words


@pytest.mark.parametrize("top", sorted({words[0] for words in COMMANDS}))
def test_help_lists_every_command(top, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    listed = capsys.readouterr().out.split("positional arguments:")[1]
    assert f"\n    {top} " in listed
    below = sorted(words[1] for words in COMMANDS if len(words) > 1 and words[0] == top)
    if below:
        with pytest.raises(SystemExit):
            main([top, "--help"])
        listed = capsys.readouterr().out.split("positional arguments:")[1]
        assert all(f"\n    {name} " in listed for name in below), below


def test_help_starts_without_tensorflow():
    code = (
        "import sys; from defectflow.cli import main\n"
        "try: main(['--help'])\n"
        "except SystemExit: pass\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[-1] == "False False"


def test_python_m_runs_the_command():
    done = subprocess.run(
        [sys.executable, "-m", "defectflow.cli", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: defectflow")


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


@pytest.mark.parametrize("command", ["train", "reproduce", "validate"])
def test_every_pipeline_command_defaults_to_the_default_recipe(command):
    """No command picks a category's config: the data comes from data.root alone."""
    args = build_parser().parse_args([command, "data.root=/some/category"])
    assert args.config == "default" and args.overrides == ["data.root=/some/category"]
