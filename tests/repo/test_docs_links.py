"""Every document the code, tests, scripts and docs point to is in the repository.

A citation is any file name ending in ``.md``, with or without a folder and an ``#anchor``, in a source, test,
benchmark, script or doc file, or in the README. It must name a Markdown file of this repository: resolved against
the repository root, ``docs/`` or the citing file's folder, or, for output tables (``results_sam`` and the like), a
file of that name somewhere in the repository or written by the code. An ``#anchor`` on a repository doc must be one of its headings (GitHub's rule for
heading ids), and so must an in-page ``](#anchor)`` link in a Markdown file. Section signs and pointers to the
design notes outside the repository are not allowed: users do not have those documents.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCOPES = ("src", "tests", "benchmarks", "scripts", "docs")
SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".cfg"}
SKIP_PARTS = {"__pycache__", ".pytest_cache"}

CITATION = re.compile(r"(?<![\w./-])([\w][\w./-]*\.md)(#[\w-]+)?(?![\w])")
IN_PAGE_LINK = re.compile(r"\]\(#([\w-]+)\)")
SECTION_SIGN = "\u00a7"
OUTSIDE_NOTES = "shared" + "/specs"  # split so that this file does not match itself


def _scanned_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for scope in SCOPES:
        for path in sorted((ROOT / scope).rglob("*")):
            if (path.is_file() and path.suffix in SUFFIXES and not SKIP_PARTS & set(path.parts)
                    and not any(p.endswith(".egg-info") for p in path.parts)):
                files.append(path)
    return files


FILES = _scanned_files()


@lru_cache(maxsize=None)
def _output_names() -> frozenset[str]:
    """Names of Markdown files that exist somewhere in the repository (committed result tables), or that the
    code writes (a quoted literal such as ``"refine_policy.md"`` in src/ or benchmarks/)."""
    names = {p.name for p in ROOT.glob("*.md")}
    names.update(p.name for scope in SCOPES for p in (ROOT / scope).rglob("*.md"))
    literal = re.compile(r"[\"']([\w-]+\.md)[\"']")
    for scope in ("src", "benchmarks"):
        for path in (ROOT / scope).rglob("*.py"):
            names.update(literal.findall(path.read_text(encoding="utf-8", errors="replace")))
    return frozenset(names)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if ROOT in path.parents else str(path)


def github_slug(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped (word characters, '-' and spaces kept),
    spaces turned into '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    """Heading ids of a Markdown file (headings inside fenced code blocks are not headings)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(out)


def resolve(name: str, citing: Path) -> Path | None:
    """The repository Markdown file a citation names, or None."""
    for base in (ROOT, ROOT / "docs", citing.parent):
        candidate = (base / name).resolve()
        if candidate.is_file() and ROOT in candidate.parents:
            return candidate
    return None


def citation_problems(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    problems = []
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{_rel(path)}:{lineno}"
        if OUTSIDE_NOTES in line:
            problems.append(f"{where}: points to design notes outside the repository")
        if SECTION_SIGN in line:
            problems.append(f"{where}: a section sign cites a document users do not have; link a docs/ heading")
        for m in CITATION.finditer(line):
            name, anchor = m.group(1), m.group(2)
            target = resolve(name, path)
            if target is None:
                if anchor is None and Path(name).name in _output_names():
                    continue  # an output table (results_sam.md, refine_policy.md, ...), not a document
                problems.append(f"{where}: cites {name}, which is not in the repository")
                continue
            if anchor and anchor[1:] not in anchors(target):
                problems.append(f"{where}: {_rel(target)} has no heading with id '{anchor[1:]}'")
        if path.suffix == ".md":
            for m in IN_PAGE_LINK.finditer(line):
                if m.group(1) not in anchors(path):
                    problems.append(f"{where}: no heading with id '{m.group(1)}' on this page")
    return problems


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_cited_documents_exist(path: Path) -> None:
    problems = citation_problems(path)
    assert not problems, "\n".join(problems)


def test_scope_covers_the_cited_docs() -> None:
    names = {_rel(p) for p in FILES}
    assert {"README.md", "docs/methods.md", "docs/protocol.md", "docs/running.md", "docs/kaf.md",
            "docs/sam.md"} <= names
    assert any(n.startswith("src/medssl/") and n.endswith(".py") for n in names)
    assert any(n.startswith("src/medssl/configs/") for n in names)


def test_github_slugs() -> None:
    assert github_slug("Refinement policies and `--policy auto`") == "refinement-policies-and---policy-auto"
    assert github_slug("## 4. Fine-tuning that keeps what was pretrained".lstrip("# ")) == (
        "4-fine-tuning-that-keeps-what-was-pretrained")
    assert github_slug("SAM 2 (optional, user checkpoint)") == "sam-2-optional-user-checkpoint"
    assert github_slug("GCL-full") == "gcl-full"


def test_the_checker_fails_on_bad_citations(tmp_path: Path) -> None:
    """The check itself can fail: a missing doc, a missing anchor, a section sign and an outside pointer."""
    md = ".md"  # assembled, so that this file cites nothing itself
    bad = tmp_path / "bad.py"
    lines = [f'"""See baselines_not_here{md} and docs/methods{md}#no-such-heading and docs/methods{md}#pcl."""',
             f"# kaf {SECTION_SIGN}2.3", f"# ../{OUTSIDE_NOTES}/kaf{md}"]
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    problems = "\n".join(citation_problems(bad))
    assert "cites baselines_not_here" in problems
    assert "no heading with id 'no-such-heading'" in problems
    assert "'pcl'" not in problems  # docs/methods.md#pcl exists
    assert "section sign" in problems
    assert "outside the repository" in problems
