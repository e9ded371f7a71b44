"""Shared by the benchmark scripts: replace (or append) one marked section of BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(name: str, title: str, text: str, path: Path = BENCHMARKS_MD) -> None:
    """Put ``text`` between ``<!-- bench:NAME -->`` markers; notes outside the markers are kept."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{text.strip()}\n{end}"
    body = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in body and end in body:
        body = body[: body.index(start)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"
    path.write_text(body)
