"""A small S3-compatible object server on loopback: the durable storage of the embedded Kafka
broker (tansu's ``s3://`` storage engine), with its data in files under one directory.

tansu 0.6.0 keeps a partition as one object per record batch plus a ``watermark.json`` (the
next offset), the topics in ``meta.json`` and committed offsets as objects, and updates them
with conditional writes (``If-None-Match: *`` to create, ``If-Match: <etag>`` to update): a
restarted broker starts with an empty cache and relies on a refused ``If-None-Match: *`` to
read the watermark before it writes. This server honours both conditions — an S3 stand-in
that ignores them (npm ``s3rver`` 3.7.1 does) lets a restarted tansu write the first batch
of a partition at offset 0 over the records already there.

Only what tansu's S3 client (Rust ``object_store``) uses is served: PUT (conditional), GET
and HEAD (``If-None-Match``, ``Range``), DELETE, multi-object delete, and ListObjectsV2.
Requests are not authenticated: it listens on 127.0.0.1 only. Each PUT writes a temporary
file and renames it over the object, so a reader or a kill -9 never sees half an object.
By default nothing is fsynced (like Kafka's default: a process crash of the broker or of this
server loses nothing, a power cut may lose the last seconds); ``--fsync`` syncs each object
and its directory before answering.

Run: ``python -m control.objectstore --dir DATA --port PORT [--bucket tansu] [--fsync]``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import http.client
import itertools
import json
import logging
import os
import re
import secrets
import signal
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from aiohttp import web

log = logging.getLogger("pilotlab.objectstore")

SUFFIX = ".obj"  # a key "a/b" and a key "a/b/c" can both exist: files end in .obj, folders not
TMP = ".tmp-"


@dataclass(slots=True)
class Entry:
    etag: str  # quoted, as S3 sends it
    size: int
    mtime: float
    listed: bytes = b""  # its <Contents> in a listing, rendered once (tansu lists a partition per fetch)


class Store:
    """The objects of one bucket: files under ``root``, an index in memory (key → Entry) and
    the keys sorted for listing."""

    def __init__(self, root: Path, fsync: bool = False) -> None:
        self.root = root
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._boot = secrets.token_hex(4)
        self._seq = itertools.count(1)
        self.index: dict[str, Entry] = {}
        self.keys: list[str] = []
        self._load()

    def _load(self) -> None:
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                path = Path(dirpath) / name
                if TMP in name:  # a write cut short by a kill: never renamed, never answered
                    path.unlink(missing_ok=True)
                    continue
                if not name.endswith(SUFFIX):
                    continue
                key = str(path.relative_to(self.root))[: -len(SUFFIX)]
                st = path.stat()
                etag = hashlib.md5(f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
                self.index[key] = Entry(f'"{etag}"', st.st_size, st.st_mtime)
        self.keys = sorted(self.index)

    def path(self, key: str) -> Path:
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
            raise web.HTTPBadRequest(text=f"invalid key {key!r}")
        return self.root / (key + SUFFIX)

    def _etag(self) -> str:
        return f'"{self._boot}-{next(self._seq):x}"'

    def put(self, key: str, body: bytes) -> Entry:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}{TMP}{next(self._seq)}")
        with open(tmp, "wb") as fh:
            fh.write(body)
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if self.fsync:
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        entry = Entry(self._etag(), len(body), path.stat().st_mtime)
        if key not in self.index:
            bisect.insort(self.keys, key)
        self.index[key] = entry
        return entry

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def delete(self, key: str) -> None:
        if self.index.pop(key, None) is None:
            return
        self.path(key).unlink(missing_ok=True)
        i = bisect.bisect_left(self.keys, key)
        if i < len(self.keys) and self.keys[i] == key:
            del self.keys[i]

    def list(self, prefix: str, after: str, limit: int, delimiter: str) -> tuple[list[str], list[str], str | None]:
        """Keys (and common prefixes) under ``prefix`` after ``after``; the last key returned
        when more remain."""
        start = bisect.bisect_right(self.keys, after) if after else bisect.bisect_left(self.keys, prefix)
        start = max(start, bisect.bisect_left(self.keys, prefix))
        keys: list[str] = []
        prefixes: list[str] = []
        last = None
        all_keys = self.keys
        for i in range(start, len(all_keys)):
            key = all_keys[i]
            if not key.startswith(prefix):
                break
            if len(keys) + len(prefixes) >= limit:
                return keys, prefixes, last
            if delimiter:
                cut = key.find(delimiter, len(prefix))
                if cut >= 0:
                    common = key[: cut + len(delimiter)]
                    if not prefixes or prefixes[-1] != common:
                        prefixes.append(common)
                    last = key
                    continue
            keys.append(key)
            last = key
        return keys, prefixes, None


def _http_date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, tz=UTC), usegmt=True)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _error(status: int, code: str, message: str, key: str = "") -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message><Key>{escape(key)}</Key></Error>"
    )
    return web.Response(status=status, body=body.encode(), content_type="application/xml")


def _meta_headers(entry: Entry) -> dict[str, str]:
    return {"ETag": entry.etag, "Last-Modified": _http_date(entry.mtime), "Accept-Ranges": "bytes"}


class Server:
    def __init__(self, store: Store, bucket: str) -> None:
        self.store = store
        self.bucket = bucket

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        parts = urlsplit(request.raw_path)
        path = unquote(parts.path)
        bucket, _, key = path.lstrip("/").partition("/")
        if bucket != self.bucket:
            return _error(404, "NoSuchBucket", f"no bucket {bucket!r}")
        query = parse_qs(parts.query, keep_blank_values=True)
        method = request.method
        try:
            if not key:
                if method == "GET":
                    return self.list(query)
                if method == "POST" and "delete" in query:
                    return await self.delete_many(request)
                if method in ("HEAD", "PUT"):
                    return web.Response(status=200)
                return _error(405, "MethodNotAllowed", f"{method} on a bucket")
            if method == "PUT":
                if "x-amz-copy-source" in request.headers:
                    return _error(501, "NotImplemented", "copy is not supported")
                return await self.put(request, key)
            if method in ("GET", "HEAD"):
                return self.get(request, key, head=method == "HEAD")
            if method == "DELETE":
                self.store.delete(key)
                return web.Response(status=204)
            return _error(405, "MethodNotAllowed", f"{method} on an object")
        except web.HTTPException as exc:
            return _error(exc.status, "InvalidRequest", exc.text or exc.reason, key)
        except OSError as exc:
            log.error("%s %s: %s", method, key, exc)
            return _error(500, "InternalError", str(exc), key)

    async def put(self, request: web.BaseRequest, key: str) -> web.Response:
        body = await request.read()
        current = self.store.index.get(key)
        if_none = request.headers.get("If-None-Match")
        if_match = request.headers.get("If-Match")
        if if_none is not None and current is not None and if_none.strip() in ("*", current.etag):
            return _error(412, "PreconditionFailed", "the object exists", key)
        if if_match is not None and (current is None or current.etag != if_match.strip()):
            if current is None:
                return _error(404, "NoSuchKey", "the object does not exist", key)
            return _error(412, "PreconditionFailed", "the object changed", key)
        entry = self.store.put(key, body)
        return web.Response(status=200, headers={"ETag": entry.etag})

    def get(self, request: web.BaseRequest, key: str, head: bool) -> web.StreamResponse:
        entry = self.store.index.get(key)
        if entry is None:
            return _error(404, "NoSuchKey", "The specified key does not exist.", key)
        if_none = request.headers.get("If-None-Match")
        if if_none is not None and if_none.strip() in ("*", entry.etag):
            return web.Response(status=304, headers=_meta_headers(entry))
        if_match = request.headers.get("If-Match")
        if if_match is not None and if_match.strip() not in ("*", entry.etag):
            return _error(412, "PreconditionFailed", "the object changed", key)
        headers = _meta_headers(entry)
        if head:
            headers["Content-Length"] = str(entry.size)
            return web.Response(status=200, headers=headers)
        try:
            data = self.store.read(key)
        except FileNotFoundError:
            return _error(404, "NoSuchKey", "The specified key does not exist.", key)
        rng = request.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            size = len(data)
            if first == "":
                start, end = max(0, size - int(last)), size - 1
            else:
                start, end = int(first), (int(last) if last else size - 1)
            end = min(end, size - 1)
            if start >= size or start > end:
                return _error(416, "InvalidRange", "The requested range is not satisfiable", key)
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            return web.Response(status=206, body=data[start : end + 1], headers=headers)
        return web.Response(status=200, body=data, headers=headers)

    @staticmethod
    def _contents(key: str, e: Entry) -> bytes:
        if not e.listed:
            e.listed = (
                f"<Contents><Key>{escape(key)}</Key><LastModified>{_iso(e.mtime)}</LastModified>"
                f"<ETag>{escape(e.etag)}</ETag><Size>{e.size}</Size><StorageClass>STANDARD</StorageClass></Contents>"
            ).encode()
        return e.listed

    def list(self, query: dict[str, list[str]]) -> web.Response:
        def q(name: str, default: str = "") -> str:
            return query.get(name, [default])[0]

        prefix, delimiter = q("prefix"), q("delimiter")
        after = q("continuation-token") or q("start-after")
        # no max-keys: every key in one answer (tansu lists a whole partition on each fetch)
        limit = max(1, int(q("max-keys", "0") or 0)) if q("max-keys") else 1 << 40
        keys, prefixes, more = self.store.list(prefix, after, limit, delimiter)
        head = [
            '<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
            f"<Name>{escape(self.bucket)}</Name><Prefix>{escape(prefix)}</Prefix>",
            f"<KeyCount>{len(keys) + len(prefixes)}</KeyCount><MaxKeys>{min(limit, 1 << 31)}</MaxKeys>",
            f"<IsTruncated>{'true' if more else 'false'}</IsTruncated>",
        ]
        if more:
            head.append(f"<NextContinuationToken>{escape(more)}</NextContinuationToken>")
        index = self.store.index
        out = ["".join(head).encode()]
        out += [self._contents(key, index[key]) for key in keys]
        out += [f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>".encode() for p in prefixes]
        out.append(b"</ListBucketResult>")
        return web.Response(status=200, body=b"".join(out), content_type="application/xml")

    async def delete_many(self, request: web.BaseRequest) -> web.Response:
        root = ElementTree.fromstring(await request.read())
        done = []
        for obj in root.iter():
            if obj.tag.endswith("Key") and obj.text:
                self.store.delete(obj.text)
                done.append(f"<Deleted><Key>{escape(obj.text)}</Key></Deleted>")
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            + "".join(done)
            + "</DeleteResult>"
        )
        return web.Response(status=200, body=body.encode(), content_type="application/xml")


# --- tansu's watermarks after a kill -------------------------------------------------------------

# Kafka's record batch v2: last_offset_delta is the int32 at byte 23 (after base offset 8,
# batch length 4, leader epoch 4, magic 1, crc 4, attributes 2)
_LAST_OFFSET_DELTA = slice(23, 27)
_PARTITION = re.compile(r"^clusters/[^/]+/topics/[^/]+/partitions/\d{10}/watermark\.json$")


def _request(base: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _list(base: str, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    token = ""
    while True:
        query = urlencode({"list-type": "2", "prefix": prefix, **({"continuation-token": token} if token else {})})
        status, _h, body = _request(base, "GET", f"/{bucket}?{query}")
        if status != 200:
            raise OSError(f"listing {prefix!r} answered {status}: {body[:200]!r}")
        root = ElementTree.fromstring(body)
        ns = root.tag.partition("}")[0] + "}" if root.tag.startswith("{") else ""
        keys += [e.text for e in root.iter(f"{ns}Key") if e.text]
        token = next((e.text for e in root.iter(f"{ns}NextContinuationToken") if e.text), "")
        if not token:
            return keys


def repair_watermarks(base: str, bucket: str = "tansu") -> list[str]:
    """Workaround for a tansu 0.6.0 bug (dynostore ``produce``): a produce first raises the
    partition's watermark, then writes the batch object. A broker killed between the two
    leaves a watermark above the last batch: the offsets in between never exist, and the next
    batch is written after the hole. A consumer that commits only contiguous offsets (the
    streams worker did, before ``streams.faust_compat.commit_applied``) never gets past it.
    The producer got no answer for that batch and sends it again, so the hole holds nothing.
    Before a durable broker starts, set each partition's watermark back to the end of its last
    batch. Returns the partitions repaired ("topic/partition: old → new")."""
    repaired = []
    for key in _list(base, bucket, "clusters/"):
        if not _PARTITION.match(key):
            continue
        status, headers, body = _request(base, "GET", f"/{bucket}/{quote(key)}")
        if status != 200:
            continue
        watermark = json.loads(body)
        high = watermark.get("high")
        if high is None:
            continue
        partition_dir = key.rsplit("/", 1)[0]
        batches = sorted(k for k in _list(base, bucket, partition_dir + "/records/") if k.endswith(".batch"))
        end = watermark.get("low") or 0
        if batches:
            last = batches[-1]
            base_offset = int(last.rsplit("/", 1)[1][:20])
            st, _h, batch = _request(base, "GET", f"/{bucket}/{quote(last)}")
            if st != 200 or len(batch) < _LAST_OFFSET_DELTA.stop:
                raise OSError(f"cannot read {last}: {st}")
            end = base_offset + int.from_bytes(batch[_LAST_OFFSET_DELTA], "big", signed=True) + 1
        if high <= end:
            continue
        watermark["high"] = end
        st, _h, answer = _request(
            base,
            "PUT",
            f"/{bucket}/{quote(key)}",
            body=json.dumps(watermark, separators=(",", ":")).encode(),
            headers={"If-Match": headers.get("ETag", "")},
        )
        if st != 200:
            raise OSError(f"cannot repair {key}: {st} {answer[:200]!r}")
        name = partition_dir.split("/topics/", 1)[1].replace("/partitions/", "/")
        repaired.append(f"{name}: {high} → {end}")
        log.warning("repaired watermark of %s: %d → %d (a batch cut short by a broker kill)", name, high, end)
    return repaired


async def serve(root: Path, port: int, bucket: str, fsync: bool, host: str = "127.0.0.1") -> None:
    store = Store(root / bucket, fsync=fsync)
    server = web.Server(Server(store, bucket).handle, access_log=None)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
    await site.start()
    log.warning(
        "object store serving %d objects of bucket %r from %s on %s:%d (fsync %s)",
        len(store.index),
        bucket,
        root,
        host,
        port,
        "on" if fsync else "off",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="data directory")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", default="tansu")
    parser.add_argument("--fsync", action="store_true", help="fsync every object before answering")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.dir.resolve(), args.port, args.bucket, args.fsync))


if __name__ == "__main__":
    main()
