"""The documentation holds together: every relative link in the README, docs/ and the dated
benchmark results names a file (and a heading) that exists, and the README keeps what CI and a
newcomer rely on: the two commands and the way to the Slicer tutorial."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("**/*.md")), *sorted((REPO / "Testing/bench/results").glob("*.md"))]
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def links(text: str) -> list[str]:
    """Link and image targets of a Markdown text, outside code blocks."""
    text = _FENCE.sub("", text)
    return [a or b for a, b in _LINK.findall(text)]


def anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown text."""
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", _FENCE.sub("", text), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower().replace("`", "")).replace(" ", "-")
        found.add(slug)
    return found


def link_problems(page: Path) -> list[str]:
    problems = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        name = page.relative_to(REPO)
        if not path.exists():
            problems.append(f"{name}: link {target} names {path_part}, which does not exist")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text(encoding="utf-8")):
            problems.append(f"{name}: link {target}: {path.name} has no heading '#{anchor}'")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    problems = link_problems(page)
    assert not problems, "\n".join(problems)


def test_readme_keeps_the_two_commands_and_the_way_to_the_tutorial() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make test" in text and "make demo" in text, "CI runs the README's test command"
    targets = links(text)
    assert "docs/slicer-tutorial.md" in targets, "the README links the Slicer tutorial"
    assert "docs/partial-labels.md" in targets
    assert len(text.splitlines()) <= 200, "the README is an entry page; the manual lives in docs/"


def test_every_doc_page_is_reachable_from_the_readme() -> None:
    seen, todo = set(), [README.resolve()]
    while todo:
        page = todo.pop()
        if page in seen or page.suffix != ".md" or not page.is_file():
            continue
        seen.add(page)
        for target in links(page.read_text(encoding="utf-8")):
            if not re.match(r"[a-z]+:", target) and target.partition("#")[0]:
                todo.append((page.parent / target.partition("#")[0]).resolve())
    unreachable = [str(p.relative_to(REPO)) for p in PAGES if p.resolve() not in seen]
    assert not unreachable, f"no chain of links from README.md reaches {unreachable}"


def test_link_checker_finds_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n", encoding="utf-8")
    page.write_text(
        "[ok](other.md#other-page) [bad](missing.md) [anchor](other.md#nothing)\n```\n[in code](ignored.md)\n```\n",
        encoding="utf-8",
    )
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        problems = link_problems(page)
    finally:
        REPO = saved
    assert len(problems) == 2, problems
    assert "missing.md" in problems[0] and "#nothing" in problems[1]
