"""The pure parts of storage/access.py: token format and parsing, what is stored of a token, a
startup's role name (including names shaped like SQL), the SCRAM-SHA-256 verifier (checked
against RFC 7677's exchange, as the server checks it), the startup's URL and Grafana YAML.
The database side: tests/integration/test_access_isolation.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from storage import access

ROLE_RE = re.compile(r"^startup_[a-z0-9_]{1,55}$")  # what roles.sql's functions and migration 0030 accept


def test_a_token_names_its_row_and_parses_back():
    seen = set()
    for _ in range(200):
        token_id, token = access.new_token()
        assert re.fullmatch(r"[0-9a-f]{16}", token_id)
        assert token.startswith(f"plt_{token_id}_") and len(token) == 4 + 16 + 1 + 43
        assert access.parse_token(token) == token_id
        seen.add(token)
    assert len(seen) == 200


@pytest.mark.parametrize(
    "token",
    [
        "",
        "plt_",
        "plt_0123456789abcdef_",
        "plt_0123456789abcdef_" + "a" * 42,  # one short
        "plt_0123456789abcdef_" + "a" * 44,  # one long
        "plt_0123456789ABCDEF_" + "a" * 43,  # the id is lower-case hex
        "plt_0123456789abcde_" + "a" * 44,
        "PLT_0123456789abcdef_" + "a" * 43,
        "xyz_0123456789abcdef_" + "a" * 43,
        " plt_0123456789abcdef_" + "a" * 43,
        "plt_0123456789abcdef_" + "a" * 42 + "\n",
        "plt_0123456789abcdef_" + "a" * 40 + "' --",
        "plt_0123456789abcdef_" + "a" * 42 + "=",
        None,
        42,
    ],
)
def test_malformed_tokens_parse_to_nothing(token):
    assert access.parse_token(token) is None


def test_only_a_sha256_of_the_whole_token_is_stored():
    _, token = access.new_token()
    h = access.token_hash(token)
    assert h == hashlib.sha256(token.encode()).digest() and len(h) == 32
    assert token.encode() not in h and token.rsplit("_", 1)[1].encode() not in h
    assert access.token_hash(token[:-1] + "x") != h


@pytest.mark.parametrize(
    ("startup", "role"),
    [
        ("beta", "startup_beta"),
        ("air_sense2", "startup_air_sense2"),
        ("Beta", f"startup_beta_{hashlib.sha256(b'Beta').hexdigest()[:6]}"),  # not its own slug: hashed
        ("Acme Air GmbH", f"startup_acme_air_gmbh_{hashlib.sha256(b'Acme Air GmbH').hexdigest()[:6]}"),
        ("  beta  ", f"startup_beta_{hashlib.sha256(b'  beta  ').hexdigest()[:6]}"),
    ],
)
def test_role_names(startup, role):
    assert access.role_name(startup) == role


@pytest.mark.parametrize(
    "startup",
    [
        'x"; DROP ROLE pilotlab_owner; --',
        "pilotlab_owner",
        "grafana_reader",
        "postgres",
        "'; SELECT pg_terminate_backend(1); --",
        'a" SUPERUSER "b',
        "beta\x00",
        "ümlaut ÄÖÜ 東京",
        "a" * 300,
        "-" * 5 + "z",
    ],
)
def test_names_shaped_like_sql_or_other_roles_become_a_plain_startup_role(startup):
    role = access.role_name(startup)
    assert ROLE_RE.fullmatch(role) and len(role.encode()) <= 63
    assert role.startswith("startup_")
    # and where it reaches SQL it is quoted as an identifier all the same
    assert sql.Identifier(role).as_string() == f'"{role}"'
    assert sql.Identifier(startup).as_string() == '"' + startup.replace('"', '""') + '"'


@pytest.mark.parametrize("startup", ["", "   ", "!!!", "---", "東京", None])
def test_a_name_with_no_letter_or_digit_has_no_role(startup):
    with pytest.raises(ValueError, match="startup name"):
        access.role_name(startup)


@given(st.text(min_size=1, max_size=200).filter(lambda s: re.search(r"[a-z0-9]", s.lower())))
def test_every_startup_gets_a_valid_deterministic_role(startup):
    role = access.role_name(startup)
    assert ROLE_RE.fullmatch(role) and len(role) <= 63
    assert access.role_name(startup) == role


@given(st.text(alphabet="abAB -_.", min_size=1, max_size=12), st.text(alphabet="abAB -_.", min_size=1, max_size=12))
def test_names_that_slug_alike_get_different_roles(x, y):
    if x == y or not re.search(r"[ab]", x.lower()) or not re.search(r"[ab]", y.lower()):
        return
    assert access.role_name(x) != access.role_name(y)


def test_scram_verifier_satisfies_rfc_7677s_exchange():
    """RFC 7677, section 3: user "user", password "pencil". A server holding our verifier must
    accept the client's proof and answer with the server signature of the RFC."""
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    verifier = access.scram_verifier("pencil", salt=salt, iterations=4096)
    m = re.fullmatch(r"SCRAM-SHA-256\$4096:([^$]+)\$([^:]+):(.+)", verifier)
    assert m and base64.b64decode(m.group(1)) == salt
    stored_key, server_key = base64.b64decode(m.group(2)), base64.b64decode(m.group(3))
    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    auth_message = (
        f"n=user,r=rOprNGfwEbeRWgbNEkqO,r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r={nonce}"
    ).encode()
    client_proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    client_signature = hmac.new(stored_key, auth_message, "sha256").digest()
    client_key = bytes(a ^ b for a, b in zip(client_proof, client_signature, strict=True))
    assert hashlib.sha256(client_key).digest() == stored_key  # the server's check of the proof
    server_signature = hmac.new(server_key, auth_message, "sha256").digest()
    assert base64.b64encode(server_signature).decode() == "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_scram_verifier_is_salted_and_refuses_what_it_cannot_prepare():
    assert access.scram_verifier("same") != access.scram_verifier("same")
    assert "same" not in access.scram_verifier("same")
    with pytest.raises(ValueError, match="ASCII"):
        access.scram_verifier("pässword")


@pytest.mark.parametrize(
    "base",
    [
        "postgresql://pilotlab_owner:pw@127.0.0.1:5433/pilotlab",
        "postgresql://pilotlab_owner:pw@db.example:5432/pilotlab?sslmode=require",
        "host=10.0.0.5 port=6432 dbname=pilot user=x password=y",
    ],
)
def test_the_startups_url_is_the_base_url_with_its_role(base):
    password = "a/b:c@d?e%f&g"
    url = access.sql_url(base, "startup_beta", password)
    got, orig = conninfo_to_dict(url), conninfo_to_dict(base)
    assert got["user"] == "startup_beta" and got["password"] == password
    assert (got["host"], got["port"], got["dbname"]) == (orig["host"], orig["port"], orig["dbname"])
    assert got.get("sslmode") == orig.get("sslmode")
    assert "pilotlab_owner" not in url and ":pw@" not in url


def test_the_grafana_datasource_reads_as_the_startups_role():
    text = access.grafana_datasource(
        "postgresql://pilotlab_owner:pw@db:5432/pilotlab", "startup_beta", 'Beta "Labs": 1', timescaledb=True
    )
    doc = yaml.safe_load(text)
    (ds,) = doc["datasources"]
    assert doc["apiVersion"] == 1
    assert ds["user"] == "startup_beta" and ds["url"] == "db:5432" and ds["name"] == 'pilotlab (Beta "Labs": 1)'
    assert ds["jsonData"]["database"] == "pilotlab" and ds["jsonData"]["timescaledb"] is True
    assert ds["secureJsonData"]["password"] == "${PILOTLAB_STARTUP_DB_PASSWORD}"
    assert "pilotlab_owner" not in text and ":pw" not in text
    given_pw = yaml.safe_load(access.grafana_datasource("postgresql://x@h:1/d", "startup_b", "b", password="p: w"))
    assert given_pw["datasources"][0]["secureJsonData"]["password"] == "p: w"


def test_a_principal_without_a_startup_is_the_lab():
    assert access.Principal("0" * 16, None, None, "").is_lab
    assert not access.Principal("0" * 16, "beta", "startup_beta", "").is_lab
