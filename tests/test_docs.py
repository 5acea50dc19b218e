"""The README stays a newcomer's path (at most ~12 KB) with the reference in docs/: every relative
link in them (and in the notebooks' text) resolves, and every docs page is reachable."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
README_LIMIT = 12_288  # bytes
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    links = [target.split("#", 1)[0] for target in LINK.findall(text)]
    return [t for t in links if t and not re.match(r"^[a-z]+:", t)]


def test_links_are_found():
    """The link reader can fail: it sees relative links and ignores web ones."""
    assert relative_links("[a](docs/x.md#y) ![b](p.png) [c](https://x.org) [d](#top)") == ["docs/x.md", "p.png"]


@pytest.mark.parametrize("page", PAGES + NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    if page.suffix == ".ipynb":
        text = "\n".join("".join(c["source"]) for c in json.loads(page.read_text())["cells"]
                         if c["cell_type"] == "markdown")
    else:
        text = page.read_text()
    broken = [t for t in relative_links(text) if not (page.parent / t).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to files that do not exist: {broken}"


def test_readme_is_a_short_path():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes (limit {README_LIMIT}): move reference text to docs/"


def test_every_docs_page_is_linked():
    linked = set()
    for page in PAGES:
        linked |= {(page.parent / t).resolve() for t in relative_links(page.read_text())}
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not orphans, f"docs pages no page links to: {orphans}"
