"""`defectflow serve` (defectflow.cli.serve); `review` is tested with the inbox, in
tests/serving/test_inbox.py."""

from defectflow.cli import main


def test_serve_refuses_a_busy_port(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert "cannot serve" in capsys.readouterr().err
