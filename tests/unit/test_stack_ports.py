"""control.stack's port choice on a restart: keep the old port once it is free again."""

from __future__ import annotations

import socket
import threading

from control.stack import free_port, port_busy, port_free_soon


def test_a_port_that_frees_within_the_wait_is_kept_and_one_held_is_not() -> None:
    port = free_port()
    server = socket.socket()
    server.bind(("127.0.0.1", port))
    server.listen()
    try:
        assert port_busy(port)
        assert not port_free_soon(port, wait_s=0.3)  # still held when the wait runs out
        threading.Timer(0.3, server.close).start()  # a killed server's socket going away
        assert port_free_soon(port, wait_s=5.0)
    finally:
        server.close()
    assert port_free_soon(free_port(), wait_s=0.0)
