"""CI must run exactly the README's test command (the developers' contract)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    commands = [b.strip() for b in blocks if b.strip().endswith("python -m pytest")]
    assert len(commands) == 1, f"expected one README block ending in pytest, got {commands}"
    return commands[0]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_test_command() in ci, "update .ci/run to the README's test command"
