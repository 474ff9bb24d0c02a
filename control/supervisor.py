"""Keep one pipeline service running: ``pilotlab run ingest|streams|sink`` starts the service
as a child process and starts it again, after a back-off, whenever it exits with an error.

The services ride out what they can in-process (broker reconnects, database retries, commit
failures); the supervisor is for the rest — a Faust worker that stops on a broker error it
cannot handle while the broker restarts, an unexpected exception. Every service is
crash-safe by construction (MQTT messages are acknowledged only after Kafka confirmed them,
the streams worker's state rolls back to its last mark, the sink commits offsets after the
database), so a restart loses and double-counts nothing. Each restart is logged with the
child's exit code and its last error line (the cause); the child's own output passes through
unchanged.

A configuration error (exit code 2) is not retried. SIGTERM/SIGINT are passed to the child
and end the supervisor once the child has stopped. The child dies with the supervisor
(``PR_SET_PDEATHSIG``), so ``kill -9`` of the supervisor leaves no orphan consuming Kafka.
"""

from __future__ import annotations

import ctypes
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence

log = logging.getLogger("pilotlab.supervisor")

CONFIG_ERROR = 2  # SettingsError, bad arguments: restarting would not help
_ERRORISH = re.compile(r"ERROR|CRITICAL|Error|Exception|error:|Traceback")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Supervisor:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        min_backoff: float = 1.0,
        max_backoff: float = 30.0,
        stable_after: float = 60.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.min_backoff, self.max_backoff, self.stable_after = min_backoff, max_backoff, stable_after
        self.stopping = threading.Event()
        self.child: subprocess.Popen | None = None
        self.restarts = 0
        self._tail: deque[str] = deque(maxlen=200)

    def _pump(self, proc: subprocess.Popen) -> None:
        out = sys.stdout.buffer
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            out.write(raw)
            out.flush()
            self._tail.append(raw.decode(errors="replace").rstrip())

    def cause(self) -> str:
        """The child's last error-looking line (the exception of a traceback), else its last line."""
        lines = [line for line in self._tail if line.strip()]
        for line in reversed(lines):
            if _ERRORISH.search(line) and not line.startswith(("  File ", "Traceback")):
                return line.strip()[:300]
        return lines[-1].strip()[:300] if lines else "no output"

    def stop(self, *_args) -> None:
        self.stopping.set()
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        backoff = self.min_backoff
        while True:
            self._tail.clear()
            started = time.monotonic()
            self.child = subprocess.Popen(
                self.argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - single-threaded at this point
            )
            pump = threading.Thread(target=self._pump, args=(self.child,), daemon=True)
            pump.start()
            code = self.child.wait()
            pump.join(timeout=5)
            if self.stopping.is_set():
                return code if code >= 0 else 0
            if code == 0:
                log.info("%s exited by itself (code 0)", self.name)
                return 0
            if code == CONFIG_ERROR:
                log.error("%s refused its configuration (exit code 2): %s; not restarting", self.name, self.cause())
                return code
            if time.monotonic() - started > self.stable_after:
                backoff = self.min_backoff
            self.restarts += 1
            log.error(
                "%s exited with code %d after %.0f s (cause: %s); restart %d in %.1f s",
                self.name,
                code,
                time.monotonic() - started,
                self.cause(),
                self.restarts,
                backoff,
            )
            if self.stopping.wait(backoff):
                return 0
            backoff = min(backoff * 2, self.max_backoff)


def supervise(name: str, argv: Sequence[str]) -> int:
    """Run ``argv`` under a :class:`Supervisor` with SIGTERM/SIGINT handled; the exit code."""
    sup = Supervisor(name, argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, sup.stop)
    return sup.run()
