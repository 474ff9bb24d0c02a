"""The plain peer: a paho subscriber that INSERTs every MQTT message into ``peer_readings``.

The simplest honest program a developer would write for "MQTT telemetry → rows in
PostgreSQL": one QoS 1 subscription, and in ``on_message`` one INSERT per message (all the
datapoints of the message in one multi-row statement) on one psycopg 3 connection in
autocommit mode. The broker gets its PUBACK once ``on_message`` returns, i.e. after the row
is committed. No batching, no threads, no queue.

    PEER_MQTT_HOST=127.0.0.1 PEER_MQTT_PORT=1883 PEER_MQTT_USER=... PEER_MQTT_PASSWORD=... \\
    PEER_DATABASE_URL=postgresql://... python bench/peers/paho_insert.py

The table is created by bench/peers (``create_table``); this script only writes to it.
Stops on SIGTERM / SIGINT.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from datetime import UTC, datetime

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

TOPIC = "pilots/+/+/telemetry"
COLUMNS = "(ts, device_id, metric, value, seq)"


def rows_of(topic: str, payload: bytes) -> list[tuple]:
    """``pilots/{experiment}/{device}/telemetry`` + ``[{"seq", "ts", "metrics"}, ...]`` (or one
    reading) → one row per datapoint."""
    device = topic.split("/")[2]
    readings = json.loads(payload)
    if isinstance(readings, dict):
        readings = [readings]
    return [
        (datetime.fromtimestamp(r["ts"] / 1000, UTC), device, metric, value, r["seq"])
        for r in readings
        for metric, value in r["metrics"].items()
    ]


def insert_statement(n_rows: int) -> str:
    values = ", ".join(["(%s, %s, %s, %s, %s)"] * n_rows)
    return f"INSERT INTO peer_readings {COLUMNS} VALUES {values} ON CONFLICT DO NOTHING"


def main() -> int:
    env = os.environ
    conn = psycopg.connect(env["PEER_DATABASE_URL"], autocommit=True)

    def on_connect(client, _userdata, _flags, reason_code, _props) -> None:
        if reason_code.is_failure:
            print(f"paho-insert: MQTT connection refused: {reason_code}", file=sys.stderr, flush=True)
            client.disconnect()
            return
        client.subscribe(TOPIC, qos=1)

    def on_subscribe(_client, _userdata, _mid, reason_codes, _props) -> None:
        print(f"paho-insert: subscribed to {TOPIC}: {[str(rc) for rc in reason_codes]}", flush=True)

    def on_message(_client, _userdata, msg) -> None:
        rows = rows_of(msg.topic, msg.payload)
        if rows:
            conn.execute(insert_statement(len(rows)), [v for row in rows for v in row])

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=env.get("PEER_CLIENT_ID") or f"peer-paho-insert-{uuid.uuid4().hex[:8]}",
    )
    if env.get("PEER_MQTT_USER"):
        client.username_pw_set(env["PEER_MQTT_USER"], env.get("PEER_MQTT_PASSWORD"))
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    signal.signal(signal.SIGINT, lambda *_: client.disconnect())
    client.connect(env.get("PEER_MQTT_HOST", "127.0.0.1"), int(env.get("PEER_MQTT_PORT", "1883")))
    try:
        client.loop_forever()
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
