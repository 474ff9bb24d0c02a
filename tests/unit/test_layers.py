"""One-way layers (docs/architecture.md): every import in the product's packages, top-level or
inside a function, read with ``ast`` and checked against the table below.

* ``pilotlab`` is the ground: it imports nothing of the product but itself.
* ``ingest``, ``streams``, ``storage``, ``dashboards``, ``simulators`` are the layers: each
  imports the ground and itself; they meet through Kafka topics and the database. The only
  edges between layers are those in ``BETWEEN_LAYERS``.
* ``control`` is the control room (CLI, embedded stack, demo, service runner, pytest plugin):
  it may import everything, and nothing imports it.
* tests/ and bench/ may import anything (they are not scanned).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GROUND = "pilotlab"
LAYERS = ("ingest", "streams", "storage", "dashboards", "simulators")
CONTROL = "control"
PACKAGES = (GROUND, *LAYERS, CONTROL)
UNSCANNED = ("tests", "bench")  # may import anything

# (importer, imported module or package): why. The read side reads the database through
# storage's named query functions; nothing else crosses between layers.
BETWEEN_LAYERS = {
    ("dashboards", "storage.queries"): "the report and the portal read through the query layer",
    ("dashboards", "storage.portal_queries"): "the portal's pages read through its query functions",
    ("dashboards", "storage.access"): "the portal authenticates a token and reads in the startup's scope (RLS)",
}


@dataclass(frozen=True)
class Violation:
    module: str
    line: int
    imported: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.imported}"


def is_module(name: str) -> bool:
    """A module or package of this repository (``a.b`` is a/b.py or a/b/)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """Every module ``source`` imports, anywhere in the file: ``from a import b`` counts as
    ``a.b`` when that is a module, else as ``a``; relative imports are resolved."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if alias.name != "*" and is_module(sub) else base))
    return list(dict.fromkeys(found))  # `from a import b, c` names a once


def package(module: str) -> str:
    return module.split(".", maxsplit=1)[0]


def allowed(importer: str, imported: str) -> bool:
    source, target = package(importer), package(imported)
    if target not in PACKAGES or source in {target, CONTROL}:
        return True
    if target == GROUND:
        return True  # every package stands on the ground
    return any(
        source == frm and (imported == to or imported.startswith(to + ".")) for frm, to in BETWEEN_LAYERS
    )


def violations(module: str, source: str, is_package: bool = False) -> list[Violation]:
    return [
        Violation(module, line, imported)
        for line, imported in imported_modules(module, source, is_package)
        if not allowed(module, imported)
    ]


def product_modules() -> list[tuple[str, bool, str]]:
    """(module, is a package, source) of every .py file of the scanned packages."""
    found = []
    for path in sorted(p for top in PACKAGES for p in (ROOT / top).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        found.append((".".join(parts[:-1] if is_package else parts), is_package, path.read_text()))
    return found


# --- the rule on synthetic modules: it must catch backwards imports ---------------------------


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        # the ground imports a layer or the control room, top-level or hidden in a function
        ("pilotlab.settings", "from control.stack import Stack\n", ["control.stack"]),
        ("pilotlab.settings", "def f():\n    from storage.migrate import migrate\n", ["storage.migrate"]),
        ("pilotlab.health", "import ingest.service\n", ["ingest.service"]),
        ("pilotlab.metrics", "from storage import sink\n", ["storage.sink"]),
        # a layer imports another layer, or the control room
        ("simulators.spec", "from ingest.decode import Limits\n", ["ingest.decode"]),
        ("streams.app", "if True:\n    import storage\n", ["storage"]),
        ("storage.sink", "from control import stack\n", ["control.stack"]),
        ("dashboards.report", "from storage.sink import TOPICS\n", ["storage.sink"]),
        ("dashboards.report", "from storage import writer\n", ["storage.writer"]),
        # relative imports resolve to what they name
        ("dashboards.portal.app", "from ...storage import sink\n", ["storage.sink"]),
        # what is allowed
        ("simulators.spec", "from pilotlab.contracts import Limits\nimport yaml\n", []),
        ("dashboards.report", "from storage import queries\nfrom storage.queries import ImpactValue\n", []),
        ("dashboards.portal.views", "from ..report import load\nfrom . import settings\n", []),
        ("control.cli", "from streams.app import main\nfrom storage.sink import main\n", []),
        ("pilotlab.lag", "from pilotlab import kafka_admin\n", []),
    ],
)
def test_the_rule_flags_backwards_imports(module: str, source: str, expected: list[str]) -> None:
    assert [v.imported for v in violations(module, source)] == expected


def test_every_python_file_belongs_to_a_package_of_the_table() -> None:
    """A new top-level package must take its place in the table (or be tests/bench)."""
    tops = {
        p.relative_to(ROOT).parts[0]
        for p in ROOT.glob("*/**/*.py")
        if not p.relative_to(ROOT).parts[0].startswith(".") and "node_modules" not in p.parts
    }
    assert tops - {*PACKAGES, *UNSCANNED} == set()


def test_no_backwards_import_in_the_product() -> None:
    modules = product_modules()
    assert len(modules) > 50  # the scan sees the product
    assert [str(v) for module, is_package, source in modules for v in violations(module, source, is_package)] == []


def test_every_allowed_edge_is_between_layers_and_used() -> None:
    """The table stays minimal: an edge nothing uses any more is removed."""
    used = {
        (package(module), imported)
        for module, is_package, source in product_modules()
        for _, imported in imported_modules(module, source, is_package)
    }
    for (importer, imported), why in BETWEEN_LAYERS.items():
        assert importer in LAYERS and package(imported) in LAYERS and why
        assert (importer, imported) in used, f"{importer} -> {imported} is allowed but unused"
