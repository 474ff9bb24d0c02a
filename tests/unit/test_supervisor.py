"""control.supervisor: a service that exits with an error is started again, with its cause
in the log; a configuration error is not retried; a stop request ends both."""

from __future__ import annotations

import logging
import sys
import threading

from control.supervisor import Supervisor


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_restarts_after_an_error_exit_and_logs_the_cause(tmp_path, caplog) -> None:
    marker = tmp_path / "runs"
    script = (
        "import pathlib, sys\n"
        f"p = pathlib.Path({str(marker)!r}); n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        "if n < 3:\n"
        "    print('Traceback (most recent call last):'); print('ConnectionError: broker down'); sys.exit(1)\n"
        "sys.exit(0)\n"
    )
    sup = Supervisor("svc", child(script), min_backoff=0.05, max_backoff=0.1)
    with caplog.at_level(logging.ERROR, logger="pilotlab.supervisor"):
        assert sup.run() == 0
    assert marker.read_text() == "3" and sup.restarts == 2
    assert "svc exited with code 1" in caplog.text and "ConnectionError: broker down" in caplog.text


def test_a_configuration_error_is_not_retried(caplog) -> None:
    sup = Supervisor("svc", child("import sys; print('error: PILOTLAB_X is missing'); sys.exit(2)"), min_backoff=0.01)
    assert sup.run() == 2 and sup.restarts == 0
    assert "PILOTLAB_X is missing" in caplog.text


def test_stop_ends_the_child_and_the_supervisor() -> None:
    sup = Supervisor("svc", child("import time; print('up', flush=True); time.sleep(60)"))
    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(sup.run()))
    t.start()
    while sup.child is None or not sup._tail:
        threading.Event().wait(0.05)
    sup.stop()
    t.join(10)
    assert not t.is_alive() and sup.restarts == 0
