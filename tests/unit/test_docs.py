"""The documentation cannot rot quietly: the docs site (docs/, mkdocs.yml) builds with
``mkdocs build --strict`` (a link to a missing page or anchor, or a page left out of the nav,
fails it), the README stays short and its relative links resolve (anchors into docs/ pages
included), its folder table names every top-level folder, and no text cites an internal
issue number."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_BYTES = 12 * 1024

# "issue 12", "issues 3 and 4", "Issue #7", "#13" (not a markdown anchor, an HTML entity or a
# URL fragment, which start with a letter)
ISSUE_NUMBER = re.compile(r"(?i)\bissues?\s*#?\d+|(?<![\w&/#])#\d+\b")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _links(markdown: str) -> list[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)  # links in code blocks are not links
    return [a or b for a, b in LINK.findall(text)]


def _relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs) -> None:
        self.ids.update(v for k, v in attrs if k == "id" and v)


def _nav_files(nav) -> list[str]:
    files = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        files += _nav_files(value) if isinstance(value, list) else [value]
    return files


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
         "--site-dir", str(out)],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
    return out


def test_the_docs_site_builds_strictly(site: Path):
    pages = sorted(p.relative_to(DOCS).with_suffix("") for p in DOCS.rglob("*.md"))
    for page in pages:
        html = site / ("index.html" if page.name == "index" else page / "index.html")
        assert html.is_file(), f"docs/{page}.md was not built"


def test_every_docs_page_is_in_the_nav():
    """mkdocs only notes a page missing from the nav; a reader would never find it."""
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = _nav_files(config["nav"])
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(listed) == on_disk
    assert len(listed) == len(set(listed)), "a page is in the nav twice"


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; the reference belongs in docs/"


def test_readme_relative_links_resolve(site: Path):
    links = [t for t in _links(README.read_text(encoding="utf-8")) if _relative(t)]
    assert any(t.startswith("docs/") for t in links), "the README links into docs/"
    for target in links:
        path, _, anchor = target.partition("#")
        assert (REPO / path).exists(), f"README.md links to {path}, which does not exist"
        if anchor and path.startswith("docs/") and path.endswith(".md"):
            page = Path(path).relative_to("docs").with_suffix("")
            html = site / ("index.html" if page.name == "index" else page / "index.html")
            ids = _Ids()
            ids.feed(html.read_text(encoding="utf-8"))
            assert anchor in ids.ids, f"README.md links to {target}: no such heading in {path}"


def test_readme_folder_table_names_every_top_level_folder():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    folders = sorted({f.split("/", 1)[0] for f in tracked if "/" in f})
    text = README.read_text(encoding="utf-8")
    missing = [f for f in folders if f"| `{f}/` |" not in text]
    assert not missing, f"README.md's folder table lacks {missing}"
    listed = re.findall(r"^\| `([^`]+)/` \|", text, flags=re.M)
    gone = [f for f in listed if f not in folders]
    assert not gone, f"README.md's folder table names folders that are not in the repository: {gone}"


def test_issue_number_pattern():
    cites = ["see issue 12", "issues 3 and 4", "Issue #7", "fixed in #13", "(issue8)"]
    fine = ["[x](ops.md#the-mqtt-window)", "&#8212;", "https://x.example/a#L12", "an issue's scale", "C#1"]
    assert all(ISSUE_NUMBER.search(s) for s in cites)
    assert not any(ISSUE_NUMBER.search(s) for s in fine)


def test_no_internal_issue_numbers_in_readme_or_docs():
    found = []
    for path in [README, REPO / "mkdocs.yml", *sorted(DOCS.rglob("*.md"))]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if m := ISSUE_NUMBER.search(line):
                found.append(f"{path.relative_to(REPO)}:{n}: {m.group(0)!r}")
    assert not found, "internal issue numbers mean nothing to a reader:\n" + "\n".join(found)
