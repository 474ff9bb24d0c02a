"""CPU seconds and disk writes per process tree, read from Linux's /proc (no dependency).

A tree's CPU is the user + system time of the root and of every live descendant, plus the
time of descendants already reaped (``cutime``/``cstime`` of their parents): the difference
of two snapshots is the CPU the tree used in between, also when a child (a PostgreSQL
backend) started or exited in between.

A tree's disk writes are the ``write_bytes`` of /proc/<pid>/io (what the process caused to
be written to storage, page cache included) of the root and its live descendants. Linux
keeps no such total for reaped children: a process that exits between two snapshots takes
its share with it (PostgreSQL's WAL writer, checkpointer and the services' sessions live
through a run; a short-lived backend does not count).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds incl. reaped children) of a live process, else None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw.rsplit(")", 1)[1].split()
    # after the command: state ppid ... utime(12) stime(13) cutime(14) cstime(15), 0-based
    ppid = int(fields[1])
    ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return ppid, ticks / TICK


def _all() -> dict[int, tuple[int, float]]:
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                out[int(entry.name)] = st
    return out


def _trees(roots: dict[str, int]) -> tuple[dict[str, list[int]], dict[int, tuple[int, float]]]:
    """The live pids of each named process tree (none for a root that is gone), and /proc's
    (parent, CPU seconds) of every live process."""
    procs = _all()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    for name, root in roots.items():
        pids, todo = [], [root] if root in procs else []
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(children.get(pid, ()))
        out[name] = pids
    return out, procs


def tree_cpu(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process tree (0.0 for a root that is gone)."""
    return tree_usage(roots)[0]


def tree_usage(roots: dict[str, int]) -> tuple[dict[str, float], dict[str, int]]:
    """CPU seconds and bytes written so far of each named process tree, from one walk of /proc."""
    trees, procs = _trees(roots)
    cpu = {name: sum(procs[pid][1] for pid in pids) for name, pids in trees.items()}
    return cpu, {name: sum(_written(pid) for pid in pids) for name, pids in trees.items()}


def _written(pid: int) -> int:
    """Bytes a live process caused to be written to storage so far (0 if gone or unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds, total CPU seconds) of the whole machine, all cores, from /proc/stat."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(v) / TICK for v in parts[:8]]
    idle = vals[3] + vals[4]  # idle + iowait
    total = sum(vals)
    return total - idle, total


@dataclass
class CpuMeter:
    """CPU used per named process tree between ``start()`` and ``stop()``, as cores busy
    (CPU seconds / wall seconds), plus this process itself (``harness``: its own threads, not
    its children), the whole machine and what nothing tracked used (other programs on the box)."""

    roots: dict[str, int]
    _t0: float = 0.0
    _cpu0: dict[str, float] | None = None
    _machine0: tuple[float, float] = (0.0, 0.0)
    _self0: float = 0.0
    _written0: dict[str, int] | None = None

    def start(self) -> CpuMeter:
        self._t0 = time.monotonic()
        self._cpu0, self._written0 = tree_usage(self.roots)
        self._machine0 = machine_busy()
        self._self0 = time.process_time()
        return self

    def stop(self, exited: dict[str, float] | None = None) -> dict:
        """``exited``: the CPU seconds that tracked processes which exited (and were reaped)
        meanwhile reported themselves; /proc no longer knows them."""
        wall = time.monotonic() - self._t0
        cpu1, written1 = tree_usage(self.roots)
        busy1, total1 = machine_busy()
        used = {k: max(0.0, cpu1[k] - (self._cpu0 or {}).get(k, 0.0)) for k in self.roots}
        # a tree that lost a writer meanwhile can show less than at the start: 0, not negative
        written = {k: max(0, written1[k] - (self._written0 or {}).get(k, 0)) for k in self.roots}
        for k, v in (exited or {}).items():
            used[k] = max(used.get(k, 0.0), v)
        used["harness"] = time.process_time() - self._self0
        busy = busy1 - self._machine0[0]
        cores = (total1 - self._machine0[1]) / wall if wall > 0 else 0.0
        return {
            "wall_s": round(wall, 2),
            "cores_busy": {k: round(v / wall, 3) for k, v in used.items()} if wall > 0 else {},
            "cpu_s": {k: round(v, 2) for k, v in used.items()},
            "written_bytes": written,
            "machine_cores_busy": round(busy / wall, 3) if wall > 0 else 0.0,
            "machine_cores": round(cores),
            "untracked_cores_busy": round(max(0.0, busy - sum(used.values())) / wall, 3) if wall > 0 else 0.0,
        }
