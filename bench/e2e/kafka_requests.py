"""Kafka requests per second by API key and by the process that sent them, counted passively
on the loopback interface (no change to the broker or the clients).

tansu 0.6.0 exports no request metrics (only OTLP traces and metrics, which would need a
collector), and the services use two Kafka clients (librdkafka, aiokafka), so the benchmark
counts on the wire instead: an ``AF_PACKET`` socket on ``lo`` (Linux, root or CAP_NET_RAW)
sees each TCP segment sent to the broker's port once, and the Kafka request header at the
start of each request (size, api_key, api_version, correlation id) names the API. A segment
boundary is tracked per connection, so requests split over segments or pipelined in one are
counted once each. The sending process is found from the connection's local port
(``/proc/net/tcp`` → socket inode → ``/proc/<pid>/fd``), then the named process tree it
belongs to.

The counts are exact while the socket drops nothing; ``dropped`` (the kernel's drop count)
says when it did. The harness pays the parsing: a few µs per loopback packet, in its own
CPU column.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import threading
import time
from collections import Counter
from pathlib import Path

# Apache Kafka's API keys (the ones a client of tansu sends)
API_NAMES = {
    0: "Produce",
    1: "Fetch",
    2: "ListOffsets",
    3: "Metadata",
    8: "OffsetCommit",
    9: "OffsetFetch",
    10: "FindCoordinator",
    11: "JoinGroup",
    12: "Heartbeat",
    13: "LeaveGroup",
    14: "SyncGroup",
    15: "DescribeGroups",
    16: "ListGroups",
    17: "SaslHandshake",
    18: "ApiVersions",
    19: "CreateTopics",
    20: "DeleteTopics",
    22: "InitProducerId",
    32: "DescribeConfigs",
    36: "SaslAuthenticate",
    60: "DescribeCluster",
}
ETH_P_ALL = 0x0003
PACKET_HOST = 0
SOL_PACKET = 263
PACKET_STATISTICS = 6
MAX_REQUEST = 64 * 1024 * 1024
SEQ = 1 << 32
SO_ATTACH_FILTER = 26
SNAP = 2048  # bytes of each packet kept: every header, and small requests whole


def bpf_to_port(port: int) -> list[tuple[int, int, int, int]]:
    """A classic BPF program (what ``tcpdump -dd 'tcp dst port P'`` gives for IPv4, plus the packet
    type): only TCP segments to ``port`` arriving on the interface reach the socket, cut to SNAP
    bytes, so the harness copies no MQTT, PostgreSQL or fetch-response traffic."""
    return [
        (0x20, 0, 0, 0xFFFFF004),  # ld pkttype (SKF_AD_OFF + SKF_AD_PKTTYPE)
        (0x15, 0, 10, PACKET_HOST),  # not incoming: drop
        (0x28, 0, 0, 12),  # ldh ethertype
        (0x15, 0, 8, 0x0800),  # not IPv4: drop
        (0x30, 0, 0, 23),  # ldb IP protocol
        (0x15, 0, 6, 6),  # not TCP: drop
        (0x28, 0, 0, 20),  # ldh fragment offset
        (0x45, 4, 0, 0x1FFF),  # a fragment: drop
        (0xB1, 0, 0, 14),  # ldxb 4*([14]&0xf): IP header length
        (0x48, 0, 0, 16),  # ldh [x+16]: TCP destination port
        (0x15, 0, 1, port),
        (0x06, 0, 0, SNAP),  # keep SNAP bytes
        (0x06, 0, 0, 0),  # drop
    ]


def attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    insns = (Insn * len(program))(*[Insn(*i) for i in program])
    fprog = struct.pack("HL", len(program), ctypes.addressof(insns))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def parse_requests(payload: bytes, start: int) -> tuple[list[int], int]:
    """API keys of the requests that begin in ``payload`` at ``start`` and after each other,
    and the offset (possibly past the payload's end) where the next request begins."""
    keys, at = [], start
    while at + 8 <= len(payload):
        size, api_key, version = struct.unpack_from(">ihh", payload, at)
        if size < 4 or size > MAX_REQUEST or api_key not in API_NAMES or not 0 <= version < 32:
            return keys, -1  # not a request header: out of step (lost a segment)
        keys.append(api_key)
        at += 4 + size
    return keys, at


class _Flow:
    __slots__ = ("next",)

    def __init__(self) -> None:
        self.next: int | None = None  # TCP sequence number where the next request begins


def segment(frame: bytes, port: int) -> tuple[int, int, bytes, int] | None:
    """(source port, sequence number, captured payload, whole payload's length) of a TCP segment
    to ``port`` in an Ethernet frame of the loopback interface (possibly cut short), else None."""
    if len(frame) < 14 + 20:
        return None
    ethertype = struct.unpack_from(">H", frame, 12)[0]
    if ethertype == 0x0800:
        ihl = (frame[14] & 0x0F) * 4
        if frame[14 + 9] != 6:
            return None
        total = struct.unpack_from(">H", frame, 16)[0]
        tcp, end = 14 + ihl, 14 + total
    elif ethertype == 0x86DD:
        if frame[14 + 6] != 6:  # next header: TCP (no extension headers on loopback)
            return None
        tcp, end = 14 + 40, 14 + 40 + struct.unpack_from(">H", frame, 18)[0]
    else:
        return None
    if len(frame) < tcp + 20:
        return None
    sport, dport, seq = struct.unpack_from(">HHI", frame, tcp)
    if dport != port:
        return None
    data = tcp + (frame[tcp + 12] >> 4) * 4
    return sport, seq, frame[data:end], max(0, end - data)


def _socket_inodes(port: int) -> dict[int, int]:
    """Local port → socket inode of the TCP connections to ``port`` (IPv4 and IPv6)."""
    out: dict[int, int] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                f = line.split()
                if int(f[2].rsplit(":", 1)[1], 16) == port:
                    out[int(f[1].rsplit(":", 1)[1], 16)] = int(f[9])
    return out


def _tree_of(roots: dict[str, int]) -> dict[int, str]:
    """pid → name of the named process tree it is in."""
    parent: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                raw = Path(f"/proc/{entry.name}/stat").read_text()
                parent[int(entry.name)] = int(raw.rsplit(")", 1)[1].split()[1])
    by_root = {pid: name for name, pid in roots.items()}
    out: dict[int, str] = {}
    for pid in parent:
        p, seen = pid, 0
        while p and seen < 64:
            if p in by_root:
                out[pid] = by_root[p]
                break
            p, seen = parent.get(p, 0), seen + 1
    return out


def _owner(inode: int, roots: dict[str, int]) -> str:
    """The named process tree holding socket ``inode``, else ``other``."""
    target = f"socket:[{inode}]"
    for pid, name in _tree_of(roots).items():
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) == target:
                        return name
    return "other"


class RequestCounter:
    """Counts Kafka requests to ``port`` on ``lo`` in a thread between ``start()`` and
    ``stop()``; ``roots`` names the process trees requests are attributed to."""

    def __init__(self, port: int, roots: dict[str, int]) -> None:
        self.port = port
        self.roots = dict(roots)
        self.counts: Counter[tuple[str, str]] = Counter()
        self._flows: dict[int, _Flow] = {}
        self._owners: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._t0 = 0.0
        self.error: str | None = None

    def start(self) -> RequestCounter:
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
            attach_filter(sock, bpf_to_port(self.port))
            sock.bind(("lo", 0))
            sock.settimeout(0.2)
        except (OSError, AttributeError) as exc:  # not Linux, or no CAP_NET_RAW: said in the results
            self.error = f"no packet socket on lo ({exc}); run as root to count Kafka requests"
            return self
        self._sock = sock
        self._stats()  # reading the statistics resets them
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="kafka-requests", daemon=True)
        self._thread.start()
        return self

    def _stats(self) -> tuple[int, int]:
        raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8) if self._sock else b"\0" * 8
        return struct.unpack("II", raw)  # packets, drops

    def _who(self, sport: int) -> str:
        who = self._owners.get(sport)
        if who is None:
            inode = _socket_inodes(self.port).get(sport)
            who = _owner(inode, self.roots) if inode else "other"
            self._owners[sport] = who
        return who

    def _run(self) -> None:
        sock = self._sock
        while not self._stop.is_set():
            try:
                frame, addr = sock.recvfrom(SNAP)
            except TimeoutError:
                continue
            if addr[2] != PACKET_HOST:  # loopback shows each packet outgoing and incoming
                continue
            seg = segment(frame, self.port)
            if seg is None or not seg[3]:
                continue
            sport, seq, payload, length = seg
            flow = self._flows.get(sport)
            if flow is None:
                flow = self._flows[sport] = _Flow()
            start = 0
            if flow.next is not None:
                ahead = (flow.next - seq) % SEQ
                if ahead >= length and ahead < SEQ // 2:
                    continue  # the middle of a request that began in an earlier segment
                if ahead < length:
                    start = ahead
                # else: a segment was missed; try this one as the start of a request
            keys, nxt = parse_requests(payload, start)
            if nxt < 0 and start != 0:  # out of step: this segment may still begin a request
                keys, nxt = parse_requests(payload, 0)
            if len(payload) < nxt < length or start > len(payload):
                nxt = -1  # the next request begins in the part not captured: find it afresh
            flow.next = (seq + nxt) % SEQ if nxt >= 0 else None
            if keys:
                who = self._who(sport)
                for k in keys:
                    self.counts[(who, API_NAMES[k])] += 1

    def stop(self) -> dict:
        """{"per_s": {process: {api: requests/s}}, "total_per_s": {api: requests/s}, ...}."""
        if self._sock is None:
            return {"error": self.error}
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        wall = time.monotonic() - self._t0
        packets, drops = self._stats()
        self._sock.close()
        per: dict[str, dict[str, float]] = {}
        total: Counter[str] = Counter()
        for (who, api), n in sorted(self.counts.items()):
            per.setdefault(who, {})[api] = round(n / wall, 1)
            total[api] += n
        return {
            "wall_s": round(wall, 2),
            "per_s": per,
            "total_per_s": {api: round(n / wall, 1) for api, n in sorted(total.items())},
            "requests_per_s": round(sum(total.values()) / wall, 1),
            "packets": packets,
            "dropped": drops,
        }
