"""Liveness, readiness and ``/metrics`` of one service process, on one HTTP port.

Each long-running service (``pilotlab run ingest|streams|sink``) serves, from the process that
does the work (the supervisor's child, never the supervisor):

- ``/metrics``: Prometheus text (``prometheus_client``'s default registry; ``/`` too);
- ``/healthz``: 200 while the service's own loop runs (it calls :meth:`Health.beat`; no beat for
  ``stale_after_s`` seconds, or a watched thread dead: 503);
- ``/readyz``: 200 when every readiness condition the service declared holds (connected,
  assigned, registry loaded...), else 503; the body (JSON) names each condition.

The server runs in daemon threads, so it answers while the service is busy or stuck — which is
what ``/healthz`` is for. ``python -m pilotlab.health SERVICE`` is docker-compose's healthcheck:
it exits 0 only when both endpoints answer 200 on the port ``PILOTLAB_<SERVICE>_METRICS_PORT``.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

log = logging.getLogger("pilotlab.health")

STALE_AFTER_S = 60.0  # no beat for this long: not alive


class Health:
    """What a service says about itself: a heartbeat from its own loop (liveness) and named
    readiness conditions, each False until the service sets it."""

    def __init__(
        self,
        service: str,
        conditions: Iterable[str] = (),
        *,
        stale_after_s: float = STALE_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._beat = clock()
        self._conditions: dict[str, bool] = dict.fromkeys(conditions, False)
        self._computed: dict[str, Callable[[], bool]] = {}
        self._threads: dict[str, Callable[[], threading.Thread | None]] = {}
        self._lock = threading.Lock()

    # the service's side ---------------------------------------------------------------------
    def beat(self) -> None:
        """The service's loop ran just now."""
        self._beat = self._clock()

    def set(self, condition: str, ok: bool) -> None:
        with self._lock:
            self._conditions[condition] = bool(ok)

    def watch(self, condition: str, check: Callable[[], bool]) -> None:
        """A readiness condition computed when asked (``check`` must be cheap and not raise)."""
        self._computed[condition] = check

    def condition(self, name: str) -> bool:
        if name in self._computed:
            return bool(self._computed[name]())
        with self._lock:
            return self._conditions.get(name, False)

    def watch_thread(self, name: str, thread: Callable[[], threading.Thread | None]) -> None:
        """Not alive once this thread (None, or not started: not yet) has ended."""
        self._threads[name] = thread

    # the probes' side ------------------------------------------------------------------------
    def since_beat(self) -> float:
        return self._clock() - self._beat

    def alive(self) -> tuple[bool, dict]:
        age = self.since_beat()
        threads = {n: get() for n, get in self._threads.items()}
        dead = sorted(n for n, t in threads.items() if t is not None and t.ident is not None and not t.is_alive())
        ok = age <= self.stale_after_s and not dead
        body = {"service": self.service, "alive": ok, "seconds_since_beat": round(age, 3)}
        if dead:
            body["threads_ended"] = dead
        return ok, body

    def ready(self) -> tuple[bool, dict]:
        with self._lock:
            conditions = dict(self._conditions)
        for name, check in self._computed.items():
            try:
                conditions[name] = bool(check())
            except Exception:  # noqa: BLE001 - a probe answers, whatever the check does
                conditions[name] = False
        alive, _ = self.alive()
        ok = alive and all(conditions.values())
        return ok, {"service": self.service, "ready": ok, "alive": alive, "conditions": conditions}

    def is_ready(self) -> float:
        """For a Prometheus gauge's ``set_function``: 1.0 when ready."""
        return 1.0 if self.ready()[0] else 0.0


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True  # a restarted service binds its port again at once


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *_args) -> None:  # probes every few seconds: not worth a log line
        pass


def app(health: Health, registry=None):
    """The WSGI application: /metrics (and /), /healthz, /readyz; 404 otherwise."""
    from prometheus_client import REGISTRY, make_wsgi_app  # noqa: PLC0415

    metrics = make_wsgi_app(registry or REGISTRY)

    def application(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz"):
            ok, body = health.alive() if path == "/healthz" else health.ready()
            data = (json.dumps(body, sort_keys=True) + "\n").encode()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]
        if path in ("/", "/metrics"):
            return metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: /metrics, /healthz, /readyz\n"]

    return application


def serve(
    port: int,
    health: Health,
    *,
    setting: str,
    addr: str = "0.0.0.0",
    registry=None,
    attempts: int = 10,
    wait_s: float = 1.0,
) -> _Server:
    """Serve /metrics, /healthz and /readyz on ``port`` in a daemon thread; returns the server.

    A port still held (a process that is shutting down) is tried again for ``attempts`` ×
    ``wait_s`` seconds; then OSError, naming the setting (the supervisor restarts the service
    after its back-off, logging that cause)."""
    last: OSError | None = None
    for attempt in range(attempts):
        try:
            server = make_server(addr, port, app(health, registry), server_class=_Server, handler_class=_QuietHandler)
            break
        except OSError as exc:
            last = exc
            if attempt + 1 < attempts:
                time.sleep(wait_s)
    else:
        raise OSError(f"cannot serve /metrics on port {port} ({setting}): {last}") from last
    thread = threading.Thread(target=server.serve_forever, name=f"{health.service}-http", daemon=True)
    thread.start()
    log.info("%s: /metrics, /healthz, /readyz on port %d", health.service, server.server_port)
    return server


# --- the healthcheck command ----------------------------------------------------------------


def default_port(service: str) -> int:
    from pilotlab import settings  # noqa: PLC0415

    cls = {"ingest": settings.IngestSettings, "streams": settings.StreamsSettings, "sink": settings.SinkSettings}
    return int(cls[service].model_fields[f"{service}_metrics_port"].default)


def check(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    """GET ``url``: (answered 200, what it said)."""
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200, resp.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        return False, f"{exc.code}: {exc.read().decode(errors='replace').strip()}"
    except OSError as exc:
        return False, str(exc)


def main(argv: list[str] | None = None) -> int:
    """``python -m pilotlab.health SERVICE [--host H] [--port P]``: 0 when /healthz and /readyz
    both answer 200 (the port: --port, else PILOTLAB_<SERVICE>_METRICS_PORT, else the default)."""
    import argparse  # noqa: PLC0415
    import os  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m pilotlab.health")
    parser.add_argument("service", choices=("ingest", "streams", "sink"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--live-only", action="store_true", help="check /healthz only")
    args = parser.parse_args(argv)
    setting = os.environ.get(f"PILOTLAB_{args.service.upper()}_METRICS_PORT")
    port = args.port or int(setting or default_port(args.service))
    ok = True
    for path in ("/healthz",) if args.live_only else ("/healthz", "/readyz"):
        good, said = check(f"http://{args.host}:{port}{path}")
        print(f"{path}: {said}")
        ok = ok and good
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
