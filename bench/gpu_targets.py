"""Issue 16's speed targets, judged from a GPU suite report (bench/gpu_suite.sh writes it).

    python bench/gpu_targets.py $OUT/gpu_suite_kernel.md  # the kernel part's last step

Reads the span benchmark's tables of the two horizon steps and prints one row per
(horizon, N, kernel row) with its ratios and the verdict against the targets:

    h_hi=100   time x fa2 <= 0.50 and time x base (the fastest SDPA backend) <= 0.70
    h_hi=end   time x fa2 <= 0.70
    both       max rel err vs float64 <= 2e-3 where it was measured

`triton` is the whole call as the runner makes it and decides the verdict; `triton_kernel`
(the launches alone), `triton_kernel_nooverlap` (QK^T not pipelined) and `triton_fold` /
`triton_kernel_fold` (the band summed in the row pass) are shown beside it with their own
verdict in brackets, to tell host overhead, the overlap's share and the better band apart.
Exit 0 when every `triton` row from 1K to 32K meets its targets, 1 when one misses or is
missing, 2 when the report has no table.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

STEP_TITLE = "span kernel vs fastest SDPA and FA2"  # the suite's horizon steps start so
SIZES = (1024, 4096, 8192, 16384, 32768)
JUDGED = "triton"
SHOWN = ("triton", "triton_kernel", "triton_kernel_nooverlap", "triton_fold", "triton_kernel_fold")
MAX_ERR = 2e-3
# horizon -> {column: bound}
TARGETS = {"100": {"time x fa2": 0.50, "time x base": 0.70}, "end": {"time x fa2": 0.70}}


@dataclass(frozen=True)
class Row:
    horizon: str
    n: int
    backend: str
    cells: dict[str, str]


def parse_report(text: str) -> list[Row]:
    """The benchmark table rows under each horizon step of the report."""
    rows: list[Row] = []
    horizon, header = None, None
    for line in text.splitlines():
        if line.startswith("## "):
            m = re.search(r"h_hi=(\S+)", line)
            horizon = m.group(1) if line[3:].startswith(STEP_TITLE) and m else None
            header = None
        elif horizon and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[:2] == ["N", "backend"]:
                header = cells
            elif header and cells[0].isdigit() and len(cells) == len(header):
                named = dict(zip(header, cells, strict=True))
                backend = named["backend"].removesuffix(" (base)")
                rows.append(Row(horizon, int(cells[0]), backend, named))
    return rows


def _number(cell: str | None) -> float | None:
    try:
        return float(cell) if cell is not None else None
    except ValueError:
        return None


def verdict(row: Row) -> tuple[bool, list[str]]:
    """(met, reasons it missed) for one row against its horizon's targets."""
    if _number(row.cells.get("ms")) is None:  # the benchmark's error text sits there
        return False, [f"not measured ({row.cells.get('ms', '-')})"]
    misses = []
    for column, bound in TARGETS.get(row.horizon, {}).items():
        got = _number(row.cells.get(column))
        if got is None:
            misses.append(f"{column} not measured ({row.cells.get(column, '-')})")
        elif got > bound:
            misses.append(f"{column} {got:.2f} > {bound:.2f}")
    err = _number(row.cells.get("max rel err"))
    if err is not None and err > MAX_ERR:
        misses.append(f"error {err:.1e} > {MAX_ERR:.0e}")
    return not misses, misses


def judge(rows: list[Row]) -> tuple[list[str], int]:
    """Markdown lines and the exit status."""
    lines = [
        "| h_hi | N | row | ms | time x fa2 | time x base | max rel err | verdict |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    missing, missed = [], 0
    for horizon in TARGETS:
        for n in SIZES:
            found = {r.backend: r for r in rows if r.horizon == horizon and r.n == n}
            if JUDGED not in found:
                missing.append(f"h_hi={horizon} N={n}")
            for backend in SHOWN:
                r = found.get(backend)
                if r is None:
                    continue
                met, why = verdict(r)
                judged = backend == JUDGED
                missed += judged and not met
                word = "met" if met else "missed: " + "; ".join(why)
                if not judged:
                    word = f"({word})"
                c = r.cells
                lines.append(
                    f"| {horizon} | {n} | {backend} | {c.get('ms', '-')} | "
                    f"{c.get('time x fa2', '-')} | {c.get('time x base', '-')} | "
                    f"{c.get('max rel err', '-')} | {word} |"
                )
    summary = f"{missed} `{JUDGED}` row(s) missed a target"
    if missing:
        summary += f"; not measured: {', '.join(missing)}"
    lines += ["", summary + "."]
    return lines, 1 if missed or missing else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="the GPU suite's markdown report")
    args = ap.parse_args(argv)
    rows = parse_report(args.report.read_text())
    if not rows:
        print(f"no span benchmark table under a '{STEP_TITLE}' step in {args.report}")
        return 2
    lines, status = judge(rows)
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
