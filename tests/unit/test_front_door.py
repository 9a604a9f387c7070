"""The README stays a front door and the shipped text stays about the product: the README is short and opens with the
command CI runs, every link between the pages resolves, no shipped text tells how it was made (that is git log), and
no function grows past what one reading holds."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
FUNCTION_MAX_LINES = 80
# Words that date text to the work that made it instead of describing the product.
HISTORY = re.compile(
    r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|this|last|previous|earlier|later|past|one)"
    r"\s+sessions?\b"
    r"|\bsession's\b"
    r"|\bthis (round|sitting)\b"
    r"|\bearlier runs? of the day\b",
    re.IGNORECASE,
)
SHIPPED_SUFFIXES = {".py", ".pyx", ".pxd", ".sh", ".yml", ".yaml", ".toml", ".md", ".c", ".h"}
SHIPPED_DIRS = ["flannel_udp", "_fastpath", "bench", "testbed", "scripts", "fuzz", "tests", "docs", ".ci"]


def shipped_files() -> list[pathlib.Path]:
    files = [README, ROOT / "pyproject.toml", ROOT / "setup.py", ROOT / ".ci" / "run"]
    for folder in SHIPPED_DIRS:
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in SHIPPED_SUFFIXES and ".build" not in path.parts and "corpus" not in path.parts:
                files.append(path)
    return [f for f in files if f.is_file() and f != pathlib.Path(__file__).resolve()]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    in_code = False
    found = set()
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(github_anchor(line.lstrip("#")))
    return found


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    first_block = README.read_text().split("```")[1]
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "bash scripts/setup.sh && .venv/bin/flannel-udp demo" in first_block
    assert ci_command in first_block, "the README's test command and .ci/run must be the same command"
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in README.read_text(), f"README's map of docs/ lacks {page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # an address outside the repository
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name} links to {target}: no such heading"


def test_no_history_in_shipped_text():
    found = []
    for path in shipped_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if HISTORY.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, "text about how the project was made (git log holds that):\n" + "\n".join(found)


def test_no_function_past_one_reading():
    long = []
    for path in shipped_files():
        if path.suffix != ".py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > FUNCTION_MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, f"functions over {FUNCTION_MAX_LINES} lines; split them at their seams:\n" + "\n".join(long)


def test_history_pattern_finds_what_it_must():
    """The check itself can fail: dated chronicles are found, product words are not."""
    for chronicle in ("(seventh session)", "The fifth session's run", "earlier sessions measured", "this round"):
        assert HISTORY.search(chronicle), chronicle
    for product in ("start_new_session=True", "a lease from an earlier run", "WireGuard session keys"):
        assert not HISTORY.search(product), product


def test_every_package_is_in_the_wheel():
    """A subpackage missing from pyproject.toml's list works from the clone and is absent from the image."""
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for top in ("flannel_udp", "_fastpath")
        for path in (ROOT / top).rglob("__init__.py")
    }
    assert found <= listed, sorted(found - listed)
