"""`anchorcredit analyze`: the paper's preplan-and-anchor coupling statistics.

    anchorcredit analyze scored.jsonl [--by task] [--json]
    anchorcredit analyze scored.jsonl --perturb [--model PATH]   (cli/analyze_perturb.py)

Prints, for the scored responses: mean entropy at WAAD peaks vs all response tokens, and
the rate at which an FAI peak falls at or right after a WAAD peak vs chance; each as
observed / random / lift with a bootstrap 95% interval, next to the paper's numbers.
Definitions (peak, chance) are in anchorcredit.offline.analysis and docs/RHYTHM.md. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from anchorcredit.cli.analyze_perturb import add_arguments as perturb_flags
from anchorcredit.cli.records import iter_scored

HELP = "coupling statistics of scored responses (entropy at WAAD peaks, FAI after WAAD)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `anchorcredit analyze`."""
    p.add_argument("scored", type=Path, nargs="+", help="JSONL written by `anchorcredit score`")
    p.add_argument(
        "--peak-quantile",
        type=float,
        default=0.5,
        help="a peak must exceed this quantile of its response (0.5 = median)",
    )
    p.add_argument(
        "--max-lag",
        type=int,
        default=1,
        help="FAI peak counts if 0 <= s - p <= max-lag after a WAAD peak p (1: at or right after)",
    )
    p.add_argument(
        "--min-lag",
        type=int,
        default=0,
        help="lower end of the lag window (default 0; -1 also counts the token before)",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the CIs (0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument(
        "--by", default=None, help="also report per value of this meta field (e.g. task)"
    )
    p.add_argument(
        "--lag-profile",
        action="store_true",
        help="also show, for lags -3..3, FAI peaks at exactly that lag after a WAAD peak",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    perturb_flags(p)


def read_records(paths: list[Path]) -> list[dict[str, Any]]:
    """All scored records of the files (blank lines skipped; bad JSON names its line)."""
    return [rec for path in paths for _, rec in iter_scored(path)]


def run(args: argparse.Namespace) -> int:
    """Print the coupling table (or JSON); 0 on success, 2 on bad input."""
    from anchorcredit.offline.analysis import PAPER, coupling_report, format_table, lag_profile

    if args.perturb:  # the perturbation test instead of the coupling statistics
        from anchorcredit.cli import analyze_perturb

        try:
            recs = read_records(args.scored)
        except (OSError, ValueError) as e:
            print(f"anchorcredit analyze: {e}", file=sys.stderr)
            return 2
        return analyze_perturb.run(args, recs)
    try:
        recs = read_records(args.scored)
        groups: dict[str, list[dict]] = {"all": recs}
        if args.by:
            by: dict[str, list[dict]] = defaultdict(list)
            for r in recs:
                by[str((r.get("meta") or {}).get(args.by, r.get(args.by)))].append(r)
            groups.update({f"{args.by}={k}": v for k, v in sorted(by.items())})
        kw = dict(
            quantile=args.peak_quantile,
            max_lag=args.max_lag,
            min_lag=args.min_lag,
            n_boot=args.bootstrap,
            seed=args.seed,
        )
        reports = {name: coupling_report(rs, **kw) for name, rs in groups.items()}
        profile = (
            lag_profile(
                [r["waad"] for r in recs], [r["fai"] for r in recs], quantile=args.peak_quantile
            )
            if args.lag_profile
            else None
        )
    except (OSError, ValueError) as e:
        print(f"anchorcredit analyze: {e}", file=sys.stderr)
        return 2

    if args.json:
        out = {
            "definitions": {
                "peak": f"local max above the {args.peak_quantile} quantile of its response",
                "fai_after_waad": f"{args.min_lag} <= fai_peak - waad_peak <= {args.max_lag}",
                "chance": "FAI peaks uniform over eligible positions (exact expectation)",
            },
            "groups": {g: {k: s.as_dict() for k, s in rep.items()} for g, rep in reports.items()},
            "lag_profile": profile,
            "paper": {
                k: dict(zip(("observed", "random", "lift"), v, strict=True))
                for k, v in PAPER.items()
            },
        }
        print(json.dumps(out, indent=2))
        return 0
    models = sorted({str(r.get("model", "?")) for r in recs})
    print(
        f"{len(recs)} responses, {sum(len(r['waad']) for r in recs)} response tokens; "
        f"model: {', '.join(models)}"
    )
    if "entropy_at_waad_peaks" not in reports["all"]:
        print("(no entropy in the file: re-score with --entropy for the entropy statistic)")
    for name, rep in reports.items():
        print(f"\n[{name}]")
        print(format_table(rep, paper=(name == "all")))
    if profile:
        print("\nFAI peaks at exactly lag d after a WAAD peak (d < 0: FAI peak first), all:")
        print(f"{'lag':>4} {'observed':>9} {'random':>9} {'lift':>8}")
        for row in profile:
            print(
                f"{row['lag']:>4} {row['observed'] * 100:>8.2f}% {row['random'] * 100:>8.2f}% "
                f"{row['lift'] * 100:>+7.1f}%"
            )
    return 0
