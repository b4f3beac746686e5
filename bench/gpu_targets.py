"""The span kernel's speed targets, judged from a GPU suite report (bench/gpu_suite.sh writes it).

    python bench/gpu_targets.py $OUT/gpu_suite_kernel.md  # the kernel part's last step

Reads every span benchmark table of the report (bench/span_benchmark.py: its rows carry
N and h_hi) and prints ONE verdict table, the launches alone (`triton_kernel*`) and the
whole call as the runner makes it (`triton*`) judged apart, so a miss names its cause:

    h_hi=100   time x fa2 <= 0.50 and time x base (the fastest SDPA backend) <= 0.70
    h_hi=end   time x fa2 <= 0.70
    both       max rel err vs float64 <= 2e-3 where it was measured

At h_hi=100 the judged path is the two-pass kernel (`triton`, `triton_kernel`); at h_hi=end
the one-pass path the runner takes where the layer's LSE is available (`triton_lse`,
`triton_kernel_lse`), with the two-pass rows shown beside (the last selected layer's path).
Sizes: one sequence of 1K..32K tokens, and the packed RL batch (512 x 1K, the runner's
layout; its base and FA2 are torch's varlen flash attention). A verdict whose ratio at the
slowest of the repeats ((1 + spread) x the median) would cross the bound is marked
borderline. Exit 0 when every judged row meets its targets, 1 when one misses or is
missing, 2 when the report has no table.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

SIZES = ("1024", "4096", "8192", "16384", "32768", "512x1024")
JUDGED = {
    "100": {"kernel": "triton_kernel", "whole call": "triton"},
    "end": {"kernel": "triton_kernel_lse", "whole call": "triton_lse"},
}
SHOWN = {  # beside the judged rows, with their own verdict in brackets
    "100": {"kernel": ("triton_kernel_lse", "triton_kernel_fold", "triton_kernel_gqa"),
            "whole call": ("triton_lse", "triton_fold", "triton_gqa")},
    "end": {"kernel": ("triton_kernel", "triton_kernel_gqa"),
            "whole call": ("triton", "triton_gqa")},
}  # fmt: skip
MAX_ERR = 2e-3
# horizon -> {column: bound}
TARGETS = {"100": {"time x fa2": 0.50, "time x base": 0.70}, "end": {"time x fa2": 0.70}}


@dataclass(frozen=True)
class Row:
    size: str
    horizon: str
    backend: str
    cells: dict[str, str]


def parse_report(text: str) -> list[Row]:
    """Every span benchmark table row of the report (a header starting `| N | h_hi |`)."""
    rows: list[Row] = []
    header = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None if not line.strip() else header
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:3] == ["N", "h_hi", "backend"]:
            header = cells
        elif header and len(cells) == len(header) and cells[0][:1].isdigit():
            named = dict(zip(header, cells, strict=True))
            backend = named["backend"].removesuffix(" (base)")
            rows.append(Row(named["N"], named["h_hi"], backend, named))
    return rows


def _number(cell: str | None) -> float | None:
    try:
        return float(cell) if cell is not None else None
    except ValueError:
        return None


def verdict(row: Row) -> tuple[bool, list[str], bool]:
    """(met, reasons it missed, borderline) for one row against its horizon's targets."""
    if _number(row.cells.get("ms")) is None:  # the benchmark's error text sits there
        return False, [f"not measured ({row.cells.get('ms', '-')})"], False
    spread = (_number(row.cells.get("spread %")) or 0.0) / 100
    misses, borderline = [], False
    for column, bound in TARGETS.get(row.horizon, {}).items():
        got = _number(row.cells.get(column))
        if got is None:
            misses.append(f"{column} not measured ({row.cells.get(column, '-')})")
        elif got > bound:
            misses.append(f"{column} {got:.2f} > {bound:.2f}")
        elif got * (1 + spread) > bound:
            borderline = True
    err = _number(row.cells.get("max rel err"))
    if err is not None and err > MAX_ERR:
        misses.append(f"error {err:.1e} > {MAX_ERR:.0e}")
    return not misses, misses, borderline


def judge(rows: list[Row]) -> tuple[list[str], int]:
    """Markdown lines (one table) and the exit status."""
    lines = [
        "| judged | h_hi | N | row | ms | spread % | time x fa2 | time x base | max rel err "
        "| verdict |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    missed: dict[str, int] = {"kernel": 0, "whole call": 0}
    missing: list[str] = []
    for kind in ("kernel", "whole call"):
        for horizon, names in JUDGED.items():
            for size in SIZES:
                found = {r.backend: r for r in rows if r.horizon == horizon and r.size == size}
                judged = names[kind]
                if judged not in found:
                    missing.append(f"{kind} {judged} h_hi={horizon} N={size}")
                for backend in (judged, *SHOWN[horizon][kind]):
                    r = found.get(backend)
                    if r is None:
                        continue
                    met, why, borderline = verdict(r)
                    word = ("met" if met else "missed: " + "; ".join(why)) + (
                        " (borderline: the spread crosses a bound)" if met and borderline else ""
                    )
                    if backend == judged:
                        missed[kind] += not met
                    else:
                        word = f"({word})"
                    c = r.cells
                    lines.append(
                        f"| {kind} | {horizon} | {size} | {backend} | {c.get('ms', '-')} | "
                        f"{c.get('spread %', '-')} | {c.get('time x fa2', '-')} | "
                        f"{c.get('time x base', '-')} | {c.get('max rel err', '-')} | {word} |"
                    )
    summary = (f"kernel: {missed['kernel']} judged row(s) missed a target; whole call: "
               f"{missed['whole call']} missed")  # fmt: skip
    if missing:
        summary += f"; not measured: {', '.join(missing)}"
    lines += ["", summary + "."]
    return lines, 1 if sum(missed.values()) or missing else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="the GPU suite's markdown report")
    args = ap.parse_args(argv)
    rows = parse_report(args.report.read_text())
    if not rows:
        print(f"no span benchmark table (a '| N | h_hi | backend |' header) in {args.report}")
        return 2
    lines, status = judge(rows)
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
