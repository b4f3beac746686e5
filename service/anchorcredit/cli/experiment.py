"""`anchorcredit experiment countdown`: the paper's Countdown A/B as one resumable command.

    anchorcredit experiment countdown --preset cpu --out results/countdown-cpu

Arms: plain TRL GRPO, and GRPO with anchorcredit credit (`random`, `entropy`,
`coupled_rhythm`) from a real `anchorcredit serve` subprocess that receives the policy's
weights after every step. Presets and flags: anchorcredit.experiments.config; the results
folder: anchorcredit.experiments.countdown; the report: anchorcredit.experiments.report.
Needs the dev extra (trl, reasoning-gym) and, for the cpu preset, the embedded SmolLM2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "the Countdown A/B (GRPO vs anchorcredit credit arms), resumable, with a report"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `anchorcredit experiment`; None means: the preset's value."""
    p.add_argument("name", choices=["countdown"], help="the experiment")
    p.add_argument("--preset", default="cpu", choices=["smoke", "cpu", "gpu"])
    p.add_argument("--out", type=Path, required=True, help="results folder (resumed if it exists)")
    p.add_argument("--model", default=None, help="policy model folder (default: the preset's)")
    p.add_argument(
        "--arms",
        type=_names,
        default=None,
        help="grpo and strategies, comma-separated (default: grpo,random,entropy,coupled_rhythm)",
    )
    p.add_argument("--seeds", type=_ints, default=None, help="comma list of seeds")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    p.add_argument("--prompts-per-step", type=int, default=None)
    p.add_argument("--generations", type=int, default=None, help="completions per prompt")
    p.add_argument("--max-completion", type=int, default=None, help="most completion tokens")
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=None, help="test accuracy every K steps")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--n-numbers", type=int, default=None, help="numbers per countdown problem")
    p.add_argument("--q", type=float, default=None, help="TopQ fraction of boosted tokens")
    p.add_argument("--gamma-amp", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report")


def run(args: argparse.Namespace) -> int:
    """Build the config from the preset and flags, then run (or resume) and report."""
    from anchorcredit.experiments.config import build_config
    from anchorcredit.experiments.countdown import log, run_experiment

    keys = (
        "model",
        "arms",
        "seeds",
        "steps",
        "prompts_per_step",
        "generations",
        "max_completion",
        "learning_rate",
        "eval_every",
        "n_train",
        "n_test",
        "n_numbers",
        "q",
        "gamma_amp",
        "threads",
    )
    try:
        cfg = build_config(args.preset, {k: getattr(args, k) for k in keys})
    except ValueError as e:
        log(str(e))
        return 2
    return run_experiment(cfg, args.out, report_only=args.report_only)
