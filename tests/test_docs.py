"""The documentation holds together: a short README that reaches every docs file, links and
anchors that resolve, nothing said twice, and a Performance table rendered from bench/results.

Unit tests: they read files and run ``bench.report``, which reads JSON; nothing else starts.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# Every Markdown file a reader can land on; links between them are checked.
PAGES = [README, *sorted(DOCS.glob("*.md")), ROOT / "deploy" / "README.md", ROOT / "api" / "ui" / "README.md",
         ROOT / "bench" / "README.md", ROOT / "sdk" / "README.md"]
README_MAX_LINES = 200  # what a newcomer reads in five minutes (issue 13, item 6)
# A paragraph this long found in two files was copied; shorter ones (a line of a list) may repeat.
COPIED_PARAGRAPH_CHARS = 200

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _outside_code(text: str) -> list[str]:
    """The lines of a Markdown text that are not inside a fenced code block."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _outside_code(path.read_text()):
        match = re.match(r"^#{1,6} (.+)$", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(path: Path) -> list[str]:
    return [target for line in _outside_code(path.read_text()) for target in LINK.findall(line)]


def _report() -> ModuleType:
    """bench/report.py, loaded by path (bench/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location("bench_report_under_test", ROOT / "bench" / "report.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_a_five_minute_read() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move the detail to docs/"


def test_every_docs_file_is_linked_from_the_readme() -> None:
    linked = {(ROOT / target.split("#", 1)[0]).resolve() for target in _links(README)}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert DOCS.is_dir() and not missing, f"README.md links no {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... are not ours to check
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_nothing_is_said_twice() -> None:
    where: dict[str, Path] = {}
    copies = []
    for page in PAGES:
        paragraphs = "\n".join(_outside_code(page.read_text())).split("\n\n")
        for paragraph in paragraphs:
            text = " ".join(paragraph.split())
            if len(text) < COPIED_PARAGRAPH_CHARS:
                continue
            first = where.setdefault(text, page)
            if first != page:
                copies.append(f"{first.relative_to(ROOT)} and {page.relative_to(ROOT)}: {text[:80]}…")
    assert not copies, "one copy, and a link from the other place: " + "; ".join(copies)


def test_the_performance_table_is_the_one_rendered_from_bench_results() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.report", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr or done.stdout


def test_the_report_rewrites_only_the_text_between_its_markers() -> None:
    report = _report()
    document = f"# Performance\n\nintro\n\n{report.BEGIN}\n\n| old |\n\n{report.END}\n\nnotes\n"
    updated = report.render_into(document, "| new |\n")
    assert updated == f"# Performance\n\nintro\n\n{report.BEGIN}\n\n| new |\n\n{report.END}\n\nnotes\n"
    assert report.render_into(updated, "| new |\n") == updated


@pytest.mark.parametrize("document", ["no markers\n", "{END}\n{BEGIN}\n", "{BEGIN}\nno end\n"])
def test_the_report_refuses_a_document_without_its_markers(document: str) -> None:
    report = _report()
    with pytest.raises(ValueError, match="markers"):
        report.render_into(document.format(BEGIN=report.BEGIN, END=report.END), "| new |\n")
