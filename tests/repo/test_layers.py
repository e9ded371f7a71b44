"""The package's layering: no upward imports and no import circles (scripts/check_imports.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_imports.py"


def test_no_upward_imports_and_no_circles():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 upward import(s), 0 circle(s)" in out.stdout
