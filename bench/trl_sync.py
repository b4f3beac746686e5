"""What the per-step weight sync costs a real TRL GRPO run (SmolLM2-135M, CPU, live service).

    python bench/trl_sync.py [--rounds 3] [--steps 3] [--dtype float32|bfloat16]
                             [--modes adapter,sync,inline] [--model DIR]

Starts `anchorcredit serve` on the model in its own process, then trains real TRL
GRPOTrainers of the same model in this process, one mode after another, `--rounds` times
(ABAB...: on a shared, loaded box the load hits every mode alike):

- adapter: AnchorCreditGRPOTrainer (advantages x gamma), no weight sync (stale_policy
  "frozen": the service keeps the starting weights on purpose);
- sync: the adapter + WeightSyncCallback, background push (the default): step n's push
  runs while step n+1's rollouts are generated;
- inline: the adapter + WeightSyncCallback(background=False): the trainer waits for the
  push after every step (the behaviour before background pushes).

Each trainer runs `--steps` optimizer steps from the starting weights; a step is the wall
time between two consecutive on_step_end calls (so a background push's wait at the next
scoring counts), and each trainer's first step is left out (start-up, the first push).
Prints a Markdown table: median step seconds per mode, the ratio to the adapter alone, and
the sync figures the adapter logged (anchorcredit/push_seconds, sync_share). At the end the
last sync trainer's final weights are loaded into a fresh in-process Scorer and its scores
compared with the service's, pinned to the last pushed version (max |difference|, must be
0.0).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from weights import _start_process  # bench/weights.py: `anchorcredit serve` in a process

PROMPTS = [
    "Write one sentence about the sea.",
    "Name three prime numbers.",
    "What is the capital of France?",
    "Give a short greeting.",
    "Describe a cat in five words.",
    "Count from one to five.",
    "What colour is the sky?",
    "Say something kind.",
]


def _reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """Varied and deterministic: rewards some lengths over others (non-zero advantages)."""
    return [float(len(str(c)) % 7) for c in completions]


def _trainer(mode: str, model_dir: Path, client: Any, steps: int, out: str) -> tuple[Any, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from anchorcredit.client.adapters.trl import WeightSyncCallback, make_trainer_class

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = trl.GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        max_steps=steps,
        learning_rate=1e-5,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        temperature=1.0,
        seed=0,
        dataloader_num_workers=0,
    )

    class StepClock(TrainerCallback):
        """Wall time between consecutive step ends (after the sync callback's)."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())

    clock = StepClock()
    callbacks: list[Any] = []
    sync = None
    if mode in ("sync", "inline"):
        sync = WeightSyncCallback(client, background=mode == "sync")
        callbacks.append(sync)
    callbacks.append(clock)  # after the sync: its on_step_end is timed
    trainer = make_trainer_class()(
        model=model,
        reward_funcs=_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        credit_client=client,
        credit_stale_policy="frozen" if sync is None else None,
        callbacks=callbacks,
    )
    return trainer, (clock, sync)


def _final_check(client: Any, model: Any, version: str) -> float:
    """max |service - fresh Scorer on `model`'s weights| over waad, fai and gamma."""
    import numpy as np

    from anchorcredit.runner import Scorer

    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]]
    responses = [[11, 12, 13, 14, 15, 16, 17, 18], [19, 20, 21, 22, 23]]
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        served_dtype = client.model_info(refresh=True).dtype
        ref = Scorer.from_pretrained(tmp, dtype=served_dtype).score(
            list(zip(prompts, responses, strict=True))
        )
    got = client.score(prompts, responses, policy_version=version)
    diff = 0.0
    for g, r in zip(got, ref, strict=True):
        for name in ("waad", "fai", "gamma"):
            diff = max(diff, float(np.max(np.abs(getattr(g, name) - getattr(r, name)))))
    return diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per trainer")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--modes", default="adapter,sync")
    ap.add_argument("--model", type=Path, default=None, help="default: the embedded SmolLM2")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the trainer and the server (a loaded box: 1 avoids stalls "
        "of a parallel region waiting for a descheduled thread)",
    )
    args = ap.parse_args()
    modes = args.modes.split(",")
    if "adapter" not in modes:
        sys.exit("--modes must include adapter (the baseline)")

    import logging
    import os

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server process inherits it

    from anchorcredit.client import CreditClient

    transformers.logging.set_verbosity_error()
    logging.getLogger("anchorcredit").setLevel(logging.WARNING)
    if args.model is None:
        from anchorcredit.models.packaged import embedded_default_path

        args.model = embedded_default_path()
    target, stop = _start_process(args.model, "cpu", args.dtype)
    steps: dict[str, list[float]] = {m: [] for m in modes}
    figures: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    last: tuple[Any, str] | None = None
    try:
        with (
            CreditClient(target, cache=False, timeout_s=600) as client,
            tempfile.TemporaryDirectory() as out,
        ):
            for r in range(args.rounds):
                for mode in modes:
                    trainer, (clock, sync) = _trainer(mode, args.model, client, args.steps, out)
                    trainer.train()
                    took = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)]
                    steps[mode] += took[1:]  # the first step: start-up and the first push
                    for h in trainer.state.log_history[1:]:
                        for k in ("push_seconds", "sync_seconds", "sync_share"):
                            if f"anchorcredit/{k}" in h:
                                figures[mode].setdefault(k, []).append(h[f"anchorcredit/{k}"])
                    print(
                        f"round {r + 1} {mode}: steps "
                        + ", ".join(f"{t:.2f}" for t in took)
                        + " s",
                        flush=True,
                    )
                    if sync is not None:
                        last = (trainer.model, sync.version)
            diff = _final_check(client, *last) if last is not None else None
    finally:
        stop()
    base = statistics.median(steps["adapter"])
    print(
        f"\nTRL GRPO, {args.model.name} float32 trainer on the CPU, `anchorcredit serve` "
        f"in {args.dtype} in its own process; {args.rounds} rounds x {len(modes)} modes "
        f"interleaved, {args.steps - 1} timed steps per trainer, {args.threads} torch "
        "thread(s) each\n"
    )
    print("| mode | median step s | vs adapter | steps | push s | sync share |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in modes:
        med = statistics.median(steps[mode])
        f = figures[mode]
        push = f"{statistics.median(f['push_seconds']):.2f}" if "push_seconds" in f else "-"
        share = f"{statistics.median(f['sync_share']):.1%}" if "sync_share" in f else "-"
        print(f"| {mode} | {med:.2f} | {med / base:.2f}x | {len(steps[mode])} | {push} | {share} |")
    if diff is not None:
        print(f"\nscores after the last sync vs a fresh Scorer on the final weights: {diff=}")


if __name__ == "__main__":
    main()
