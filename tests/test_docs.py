"""The documentation: README.md is a front page, docs/ holds a page per topic; every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"```.*?```", re.S)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower-cased, punctuation dropped, spaces as dashes."""
    text = CODE.sub("", page.read_text(encoding="utf-8"))
    out = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return out


def test_every_relative_link_of_the_docs_resolves() -> None:
    """Each link to a file (and to a heading in it) that is not a URL points at something that exists."""
    broken = []
    for page in pages():
        for target in LINK.findall(CODE.sub("", page.read_text(encoding="utf-8"))):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_is_a_front_page_linking_every_docs_page() -> None:
    """README.md stays short and links each page under docs/; the two commands stand on it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 80
    assert "make demo" in readme and "make test" in readme
    linked = {m for m in LINK.findall(readme) if m.startswith("docs/")}
    assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} <= {m.partition("#")[0] for m in linked}


def test_every_simulator_switch_is_in_its_page() -> None:
    """docs/simulator.md lists every option of `crawler sim` (the issue's rule: what is added to the simulator is
    listed on its page)."""
    from crawler.sim.__main__ import _parser

    page = (ROOT / "docs" / "simulator.md").read_text(encoding="utf-8")
    options = {o for a in _parser()._actions for o in a.option_strings if o.startswith("--")}
    missing = sorted(o for o in options - {"--help", "--host", "--port"}
                     if not re.search(f"`{re.escape(o)}(?![\\w-])", page))
    assert not missing, missing
