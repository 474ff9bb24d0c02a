"""control.objectstore: the loopback S3 server behind the durable Kafka broker. What tansu's
S3 client relies on: conditional writes, listing in key order with continuation, atomic
objects that survive a restart of the server."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import RawTestServer, TestClient

from control.objectstore import Server, Store


def run(store: Store, scenario) -> None:
    async def main() -> None:
        server = RawTestServer(Server(store, "tansu").handle)
        async with TestClient(server) as client:
            await scenario(client)

    asyncio.run(main())


def test_create_only_if_absent_and_update_only_if_unchanged(tmp_path) -> None:
    store = Store(tmp_path / "tansu")

    async def scenario(c: TestClient) -> None:
        r = await c.put("/tansu/a/watermark.json", data=b'{"high":1}', headers={"If-None-Match": "*"})
        assert r.status == 200
        etag = r.headers["ETag"]
        # a restarted broker with an empty cache tries to create it again: refused
        r = await c.put("/tansu/a/watermark.json", data=b'{"high":0}', headers={"If-None-Match": "*"})
        assert r.status == 412
        r = await c.put("/tansu/a/watermark.json", data=b'{"high":2}', headers={"If-Match": '"stale"'})
        assert r.status == 412
        r = await c.put("/tansu/a/watermark.json", data=b'{"high":2}', headers={"If-Match": etag})
        assert r.status == 200 and r.headers["ETag"] != etag
        new = r.headers["ETag"]
        r = await c.get("/tansu/a/watermark.json", headers={"If-None-Match": new})
        assert r.status == 304
        r = await c.get("/tansu/a/watermark.json", headers={"If-None-Match": etag})
        assert r.status == 200 and await r.read() == b'{"high":2}' and r.headers["ETag"] == new
        assert "Last-Modified" in r.headers
        r = await c.put("/tansu/missing", data=b"x", headers={"If-Match": etag})
        assert r.status == 404
        r = await c.get("/tansu/missing")
        assert r.status == 404 and b"NoSuchKey" in await r.read()

    run(store, scenario)


def test_listing_is_sorted_by_key_and_pages_with_a_continuation_token(tmp_path) -> None:
    store = Store(tmp_path / "tansu")
    for i in (3, 1, 2, 10):
        store.put(f"p/records/{i:020d}.batch", b"x" * i)
    store.put("p/watermark.json", b"{}")
    store.put("q/other", b"")

    async def scenario(c: TestClient) -> None:
        r = await c.get("/tansu", params={"list-type": "2", "prefix": "p/records/", "max-keys": "3"})
        body = (await r.read()).decode()
        assert body.count("<Key>") == 3 and "<IsTruncated>true</IsTruncated>" in body
        keys = [part.split("</Key>")[0] for part in body.split("<Key>")[1:]]
        assert keys == [f"p/records/{i:020d}.batch" for i in (1, 2, 3)]
        token = body.split("<NextContinuationToken>")[1].split("<")[0]
        r = await c.get("/tansu", params={"list-type": "2", "prefix": "p/records/", "continuation-token": token})
        body = (await r.read()).decode()
        assert body.count("<Key>") == 1 and f"{10:020d}.batch" in body and "<Size>10</Size>" in body
        r = await c.get("/tansu", params={"list-type": "2", "prefix": "p/", "delimiter": "/"})
        body = (await r.read()).decode()
        assert "<Prefix>p/records/</Prefix>" in body and "<Key>p/watermark.json</Key>" in body

    run(store, scenario)


def test_objects_survive_a_restart_and_a_write_cut_short_leaves_nothing(tmp_path) -> None:
    store = Store(tmp_path / "tansu")
    store.put("a/b", b"one")
    store.put("a/b/c", b"two")  # a key and a key below it can both exist
    (tmp_path / "tansu" / "a" / "d.obj.tmp-7").write_bytes(b"half")  # a kill during a write
    again = Store(tmp_path / "tansu")
    assert sorted(again.index) == ["a/b", "a/b/c"]
    assert again.read("a/b") == b"one" and again.read("a/b/c") == b"two"
    assert not (tmp_path / "tansu" / "a" / "d.obj.tmp-7").exists()
    again.delete("a/b")
    assert again.keys == ["a/b/c"]
