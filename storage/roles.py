"""Who may do what in pilotlab's database (docs/operations.md, "Database roles and privileges").

* ``pilotlab_owner`` owns the database and the schema's objects and runs the migrations
  (``PILOTLAB_DATABASE_OWNER_URL``). Not a superuser; cannot create roles.
* ``pilotlab_writer`` is the sink's role (``PILOTLAB_DATABASE_URL``): SELECT and INSERT on the
  tables the sink writes, UPDATE where it upserts, DELETE on ``devices`` only (a manifest that
  drops a device), and TEMP for the COPY staging table (``storage.writer.write_readings``).
* ``grafana_reader`` reads (``PILOTLAB_DATABASE_READER_URL``): SELECT only, no TEMP.

* ``pilotlab_startups`` (NOLOGIN) and one ``startup_<slug>`` role per startup read their own rows
  only (row-level security, migrations 0030/0031; ``storage.access``, docs/access.md). The owner
  creates startup roles through the superuser's ``pilotlab_admin`` functions (``roles.sql``).

A superuser creates the roles and pins what only a superuser can (``storage/roles.sql``:
:func:`bootstrap`); the migrations, run by the owner, grant the table privileges
(``0005_grafana_reader.sql``, ``0022_least_privilege.sql``). A migration that adds a table the
sink writes must grant it to ``pilotlab_writer`` itself: the writer gets no default privileges.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

OWNER = "pilotlab_owner"
WRITER = "pilotlab_writer"
READER = "grafana_reader"
ROLES = (OWNER, WRITER, READER)

# the custom settings roles.sql reads each role's password from
PASSWORD_SETTINGS = {
    OWNER: "pilotlab.owner_password",
    WRITER: "pilotlab.writer_password",
    READER: "pilotlab.reader_password",
}

# what the sink's role holds on each table (the test of least privilege compares against it)
WRITER_PRIVILEGES = {
    "readings": {"SELECT", "INSERT"},
    "late_readings": {"SELECT", "INSERT"},
    "device_status": {"SELECT", "INSERT"},
    "rejections": {"SELECT", "INSERT"},
    "kpi_values": {"SELECT", "INSERT", "UPDATE"},
    "experiments": {"SELECT", "INSERT", "UPDATE"},
    "devices": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    # the alerts service (streams/alerting.py) logs in as this role too: migration 0023
    "alerts": {"SELECT", "INSERT", "UPDATE"},
    "alert_deliveries": {"SELECT", "INSERT", "UPDATE"},
    "alert_state": {"SELECT", "INSERT", "UPDATE"},
    "alert_offsets": {"SELECT", "INSERT", "UPDATE"},
}


def bootstrap_sql() -> str:
    return resources.files("storage").joinpath("roles.sql").read_text(encoding="utf-8")


def bootstrap(conn: psycopg.Connection, passwords: Mapping[str, str] | None = None) -> None:
    """Run ``storage/roles.sql`` in one transaction. ``conn``: a superuser's connection to the
    application's database. ``passwords``: role → password to set (the others keep theirs)."""
    unknown = set(passwords or {}) - set(ROLES)
    if unknown:
        raise ValueError(f"no such pilotlab role: {', '.join(sorted(unknown))}")
    with conn.transaction():
        for role, password in (passwords or {}).items():
            # transaction-local: the password leaves no trace in the session
            conn.execute("SELECT set_config(%s, %s, true)", (PASSWORD_SETTINGS[role], password))
        conn.execute(bootstrap_sql())
