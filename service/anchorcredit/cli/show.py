"""`anchorcredit show`: render one scored response as an HTML page and a PNG plot.

anchorcredit show scored.jsonl --index 3 -o rhythm_html/
-> rhythm_html/<id>.html   tokens coloured by WAAD / FAI / gamma (/ entropy), preplan
                           (WAAD peak) and anchor (FAI peak) tokens marked, hover for
                           the numbers; self-contained (no scripts, no external files)
-> rhythm_html/<id>.png    WAAD and FAI (and entropy) over token position
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from anchorcredit.cli.records import iter_scored

HELP = "render one scored response (from `anchorcredit score`) as HTML + PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `anchorcredit show`."""
    p.add_argument("scored", type=Path, help="JSONL written by `anchorcredit score`")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--index", type=int, default=0, help="0-based record index in the file (default 0)"
    )
    which.add_argument("--id", dest="record_id", default=None, help="the record with this id")
    p.add_argument("-o", "--output", type=Path, required=True, help="directory to write into")
    p.add_argument("--no-png", action="store_true", help="HTML only (no matplotlib needed)")


def load_record(path: Path, index: int = 0, record_id: str | None = None) -> dict[str, Any]:
    """The index-th record (or the one with record_id) of a scored JSONL file."""
    n = 0
    for _, rec in iter_scored(path):
        if record_id is not None:
            if str(rec.get("id")) == record_id:
                return rec
        elif n == index:
            return rec
        n += 1
    if record_id is not None:
        raise ValueError(f"no record with id {record_id!r} in {path}")
    raise ValueError(f"--index {index} is out of range: {path} has {n} records")


def run(args: argparse.Namespace) -> int:
    """Write the HTML (and PNG) of one record; 0 on success, 2 on bad input."""
    from anchorcredit.cli import extras
    from anchorcredit.offline import viz

    if not args.no_png and extras.missing(["matplotlib"]):  # before writing anything
        print(
            f"anchorcredit show: the PNG plot needs matplotlib ({extras.SERVICE}, or pip "
            "install matplotlib); pass --no-png for the HTML page alone",
            file=sys.stderr,
        )
        return 2

    try:
        if args.index < 0:
            raise ValueError("--index must be >= 0")
        rec = load_record(args.scored, args.index, args.record_id)
        for key in ("waad", "fai", "gamma"):
            if key not in rec:
                raise ValueError(f"record has no {key!r}: is this `anchorcredit score` output?")
        stem = viz.safe_name(rec.get("id", f"record{args.index}"))
        args.output.mkdir(parents=True, exist_ok=True)
        html_path = args.output / f"{stem}.html"
        html_path.write_text(viz.render_html(rec), encoding="utf-8")
        print(html_path)
        if not args.no_png:
            print(viz.render_png(rec, args.output / f"{stem}.png"))
    except (OSError, ValueError) as e:
        print(f"anchorcredit show: {e}", file=sys.stderr)
        return 2
    return 0
