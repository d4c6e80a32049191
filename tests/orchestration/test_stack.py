"""Bringing the orchestration stack up and down: bookkeeping by PID, idempotence, failures."""

from __future__ import annotations

import http.server
import subprocess
import threading
from pathlib import Path

import pytest
from helpers_processes import free_port

from defectflow.orchestration import stack


def test_down_with_nothing_running_does_nothing(tmp_path):
    assert stack.down(tmp_path, say=lambda _: None) == []
    assert stack.status(tmp_path) == {"running": False}


def test_down_stops_exactly_the_recorded_processes(tmp_path):
    ours = subprocess.Popen(["sleep", "300"], start_new_session=True)
    stranger = subprocess.Popen(["sleep", "301"], start_new_session=True)
    try:
        state = stack.StackState(
            api_url="http://127.0.0.1:1/api",
            processes={
                "worker": {"pid": ours.pid, "command": ["sleep", "300"], "log": ""},
                # A PID now running something else (reused): never signalled.
                "server": {
                    "pid": stranger.pid,
                    "command": ["prefect", "server", "start"],
                    "log": "",
                },
            },
        )
        stack._write_state(tmp_path, state)
        assert stack.status(tmp_path)["processes"]["worker"]["running"]
        assert stack.down(tmp_path, grace=5, say=lambda _: None) == ["worker"]
        assert ours.wait(timeout=10) is not None
        assert stranger.poll() is None
        assert stack.read_state(tmp_path) is None
    finally:
        for p in (ours, stranger):
            p.kill()
            p.wait()


def test_up_refuses_a_port_something_else_answers_on(tmp_path):
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", free_port()), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(stack.StackError, match="something else already answers"):
            stack.up(tmp_path, port=server.server_address[1], say=lambda _: None)
    finally:
        server.shutdown()
    assert stack.read_state(tmp_path) is None


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path, monkeypatch):
    fake = tmp_path / "prefect"
    fake.write_text("#!/bin/sh\necho 'database is locked' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(stack, "_prefect", lambda: str(fake))
    with pytest.raises(stack.StackError, match="exited while starting(.|\n)*database is locked"):
        stack.up(tmp_path, port=free_port(), say=lambda _: None)
    assert "server" not in stack.read_state(tmp_path).processes  # nothing left recorded as running
    assert Path(tmp_path / "stack" / "server.log").exists()
