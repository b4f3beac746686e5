"""Reading the JSONL that `anchorcredit score` writes (shared by `show` and `analyze`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_scored(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-blank line; bad JSON or a non-record names its line."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "waad" not in rec or "fai" not in rec:
                raise ValueError(f"{path}:{lineno}: not a scored record (needs waad, fai)")
            yield lineno, rec
