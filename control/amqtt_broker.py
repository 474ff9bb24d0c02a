"""The embedded stack's fallback MQTT broker: amqtt (pure Python, from PyPI), for machines
without Mosquitto. ``pilotlab stack up`` runs it as ``python amqtt_broker.py --config FILE``.

Security as with the embedded Mosquitto: no anonymous clients; amqtt's ``FileAuthPlugin``
checks the password file (argon2 hashes, written by ``pilotlab.credentials.write_amqtt_files``
from the registry) and ``TopicAccessControlListPlugin`` the ACL (``publish_acl``: what a user
may publish to; ``acl``: what it may subscribe to). SIGHUP re-reads both files, like
Mosquitto: ``pilotlab experiments apply`` gives new devices working accounts without a
restart. SIGTERM stops the broker.

amqtt 0.12 forgets an outgoing QoS 1 message when its PUBACK does not come within 5 s or the
connection drops before it. Ingest acknowledges a message only after Kafka confirmed it, so
that would lose what ingest had received but not yet confirmed when it disconnects. The
broker here keeps such a message in its session and sends it again (DUP) when the client
reconnects, as MQTT 3.1.1 requires (``_keep_qos1_until_acknowledged``). And it drops what a
client published (and was acknowledged) but not yet handed on when that client disconnects;
here it is handed on (``_deliver_what_was_acknowledged``). What amqtt does not
do: persist anything — a restart of this broker loses its sessions and the messages queued
for them (Mosquitto saves them to disk; docs/operations.md). Pinned: amqtt==0.12.1.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a script: pilotlab/ must not shadow top-level modules
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from pathlib import Path
from typing import Any

log = logging.getLogger("pilotlab.amqtt")

AUTH_PLUGIN = "amqtt.plugins.authentication.FileAuthPlugin"
ANONYMOUS_PLUGIN = "amqtt.plugins.authentication.AnonymousAuthPlugin"
ACL_PLUGIN = "amqtt.plugins.topic_checking.TopicAccessControlListPlugin"


def broker_config(conf: dict[str, Any]) -> dict[str, Any]:
    """amqtt's configuration from ours: ``listeners`` ({name: {bind, certfile?, keyfile?}}),
    ``password_file`` and ``acl_file``, or ``anonymous: true`` (no accounts, no ACL: tests)."""
    listeners: dict[str, Any] = {}
    for name, listener in conf["listeners"].items():
        entry: dict[str, Any] = {"type": "tcp", "bind": listener["bind"], "max_connections": 0}
        if listener.get("certfile"):
            entry.update(ssl=True, certfile=listener["certfile"], keyfile=listener["keyfile"])
        listeners[name] = entry
    if conf.get("anonymous"):
        plugins: dict[str, Any] = {ANONYMOUS_PLUGIN: {"allow_anonymous": True}}
    else:
        plugins = {AUTH_PLUGIN: {"password_file": conf["password_file"]}, ACL_PLUGIN: read_acl(conf["acl_file"])}
    return {"listeners": listeners, "plugins": plugins, "timeout_disconnect_delay": 2}


def read_acl(path: str) -> dict[str, dict[str, list[str]]]:
    doc = json.loads(Path(path).read_text())
    return {"publish_acl": doc["publish_acl"], "acl": doc["acl"]}


def _keep_qos1_until_acknowledged() -> None:
    """Outgoing QoS 1: wait for the PUBACK as long as the connection lives (no 5 s give-up),
    and keep an unacknowledged message in the session when the connection drops, so that
    ``_retry_deliveries`` sends it again when the client reconnects. A PUBACK that arrives
    after its waiter is gone (a redelivery that outlived the 10 s retry window) still ends
    the message's flight."""
    from amqtt.mqtt.protocol import handler as h  # noqa: PLC0415

    original_flow = h.ProtocolHandler._handle_qos1_message_flow
    original_puback = h.ProtocolHandler.handle_puback

    async def qos1_flow(self, app_message) -> None:
        if app_message.direction != h.OUTGOING:
            return await original_flow(self, app_message)
        if app_message.puback_packet:
            return None
        self.session.inflight_out[app_message.packet_id] = app_message
        dup = app_message.publish_packet is not None
        packet = app_message.build_publish_packet(dup=dup)
        waiter: asyncio.Future = asyncio.get_running_loop().create_future()
        self._puback_waiters[app_message.packet_id] = waiter
        try:
            await self._send_packet(packet)
            app_message.publish_packet = packet
            app_message.puback_packet = await waiter
        finally:
            if self._puback_waiters.get(app_message.packet_id) is waiter:
                self._puback_waiters.pop(app_message.packet_id, None)
        # acknowledged: no longer in flight (a cancelled flow leaves it for the next session)
        self.session.inflight_out.pop(app_message.packet_id, None)
        return None

    async def handle_puback(self, puback) -> None:
        packet_id = puback.variable_header.packet_id if puback.variable_header else None
        if packet_id is not None and packet_id not in self._puback_waiters and self.session is not None:
            message = self.session.inflight_out.pop(packet_id, None)
            if message is not None:
                message.puback_packet = puback
                return
        await original_puback(self, puback)

    h.ProtocolHandler._handle_qos1_message_flow = qos1_flow
    h.ProtocolHandler.handle_puback = handle_puback


def _deliver_what_was_acknowledged() -> None:
    """amqtt 0.12 acknowledges a client's QoS 1 PUBLISH when it queues the message in the
    client's session, and hands it to the subscribers later, from that client's message loop.
    When the client disconnects, the loop ends and the messages still queued are dropped:
    a device that publishes a burst and disconnects loses the tail of it (the demo's
    publisher lost ~5% of its 20,285 acknowledged messages, a burst of 80,640 a third). Here the loop hands every queued
    message on before it ends."""
    from amqtt.broker import Broker  # noqa: PLC0415

    original = Broker._handle_disconnect

    async def handle_disconnect(self, client_session, handler, disconnect_waiter) -> None:
        # take them all at once, before any await: the session monitor empties the queue of a
        # disconnected clean session within a second
        queue, pending = client_session.delivered_message_queue, []
        while not queue.empty():
            pending.append(queue.get_nowait())
        loop = asyncio.get_running_loop()
        for message in pending:
            done = loop.create_future()
            done.set_result(message)
            await self._handle_message_delivery(client_session, handler, done)
        await original(self, client_session, handler, disconnect_waiter)

    Broker._handle_disconnect = handle_disconnect


def reload(broker, conf: dict[str, Any]) -> None:
    """SIGHUP: the password file and the ACL again (as Mosquitto does)."""
    if conf.get("anonymous"):
        return
    from amqtt.plugins.authentication import FileAuthPlugin  # noqa: PLC0415
    from amqtt.plugins.topic_checking import TopicAccessControlListPlugin  # noqa: PLC0415

    auth = broker.plugins_manager.get_plugin(FileAuthPlugin.__name__)
    acl = broker.plugins_manager.get_plugin(TopicAccessControlListPlugin.__name__)
    try:
        users = dict(auth._users)
        auth._users.clear()
        try:
            auth._read_password_file()
        except Exception:
            auth._users.update(users)  # a broken file keeps the accounts that worked
            raise
        config = TopicAccessControlListPlugin.Config(**read_acl(conf["acl_file"]))
        acl.context.config = config
        acl.config = config
    except Exception as exc:  # noqa: BLE001 - a bad reload must not stop the broker
        log.error("reload failed, keeping the previous accounts and ACL: %s", exc)
        return
    log.warning("reloaded %d accounts and the ACL", len(auth._users))


async def serve(conf: dict[str, Any]) -> None:
    from amqtt.broker import Broker  # noqa: PLC0415

    _keep_qos1_until_acknowledged()
    _deliver_what_was_acknowledged()
    broker = Broker(broker_config(conf))
    await broker.start()
    log.warning("amqtt listening on %s", ", ".join(v["bind"] for v in conf["listeners"].values()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload, broker, conf)
    await stop.wait()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(broker.shutdown(), 10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON: listeners, password_file, acl_file (or anonymous)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # amqtt logs every refused client and topic at INFO and its own warnings often; keep errors
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    conf = json.loads(Path(args.config).read_text())
    asyncio.run(serve(conf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
