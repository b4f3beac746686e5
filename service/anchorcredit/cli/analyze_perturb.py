"""`anchorcredit analyze SCORED --perturb`: the paper's perturbation test (its Table 1).

    anchorcredit analyze scored.jsonl --perturb [--ids gen.jsonl] [--model PATH]
        [--positions 2] [--top-k 5] [--rollout-tokens 32] [--seed 0] [--json]

Positions come from the FAI in the scored file; the model (default: the embedded SmolLM2;
use the one that scored the file) proposes the alternative tokens and continues greedily.
Rules and statistics: anchorcredit.offline.perturb. Prompt ids are taken, in this order,
from the record itself, from the `--ids` file (the file that was scored, joined by `id`),
or by encoding the record's `prompt` text as `anchorcredit score` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The --perturb flags of `anchorcredit analyze`."""
    g = p.add_argument_group("perturbation test (--perturb; needs torch and the model)")
    g.add_argument(
        "--perturb",
        action="store_true",
        help="force a top-k alternative token at the highest- and lowest-FAI positions, "
        "roll out greedily, compare content words with the original continuation",
    )
    g.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    g.add_argument(
        "--ids", type=Path, default=None, help="the scored input (prompt_ids by id), if needed"
    )
    g.add_argument("--positions", type=int, default=2, help="high and low positions per response")
    g.add_argument("--top-k", type=int, default=5, help="alternatives drawn from the top k")
    g.add_argument(
        "--rollout-tokens", type=int, default=32, help="most tokens rolled out after a position"
    )
    g.add_argument("--limit", type=int, default=None, help="only the first N responses")
    g.add_argument("--threads", type=int, default=None, help="torch threads")
    g.add_argument("--trials-out", type=Path, default=None, help="write every trial as JSONL here")


def _prompt_ids(recs: list[dict[str, Any]], ids_path: Path | None, tokenizer: Any) -> None:
    """Fill rec['prompt_ids'] where missing (module docstring: record, --ids, prompt text)."""
    by_id: dict[str, list[int]] = {}
    if ids_path is not None:
        with ids_path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    if "prompt_ids" in row:
                        by_id[str(row.get("id"))] = list(row["prompt_ids"])
    for rec in recs:
        if "prompt_ids" in rec:
            continue
        key = str(rec.get("id"))
        if key in by_id:
            rec["prompt_ids"] = by_id[key]
        elif rec.get("prompt") is not None:
            rec["prompt_ids"] = list(tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"])
        else:
            raise ValueError(f"record {key!r}: no prompt ids (pass --ids with the scored input)")


def load_model(path: str | None) -> tuple[Any, Any]:
    """(model, tokenizer) in float32 eval mode on the CPU; default the embedded SmolLM2."""
    from transformers import AutoModelForCausalLM

    from anchorcredit.models.packaged import embedded_default_path, load_tokenizer

    folder = Path(path) if path else embedded_default_path()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32").eval()
    return model, load_tokenizer(folder)


def run(args: argparse.Namespace, recs: list[dict[str, Any]]) -> int:
    """Run the trials and print the table (or JSON); 0 on success, 2 on bad input."""
    from anchorcredit.offline.perturb import PAPER, format_summary, summarize
    from anchorcredit.offline.perturb_rollout import run_trials, stderr_progress

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    recs = recs[: args.limit] if args.limit else recs
    try:
        model, tokenizer = load_model(args.model)
        _prompt_ids(recs, args.ids, tokenizer)
        trials = run_trials(
            model,
            tokenizer,
            recs,
            positions=args.positions,
            top_k=args.top_k,
            rollout_tokens=args.rollout_tokens,
            seed=args.seed,
            progress=stderr_progress,
        )
        summary = summarize(trials, n_boot=args.bootstrap, seed=args.seed)
    except (OSError, ValueError) as e:
        print(f"anchorcredit analyze --perturb: {e}", file=sys.stderr)
        return 2
    if args.trials_out:
        with args.trials_out.open("w") as fh:
            for t in trials:
                fh.write(json.dumps(t.__dict__) + "\n")
    if args.json:
        print(json.dumps({"perturbation": summary.as_dict(), "paper": PAPER}, indent=2))
    else:
        print(format_summary(summary))
    return 0
