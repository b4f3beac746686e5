"""What the credit metrics cost: `CreditMetrics.observe` per request against scoring it.

    python bench/credit_metrics.py                       # CPU, the cpu-small Qwen3 shape
    python bench/credit_metrics.py --device cuda --dtype bfloat16 --preset qwen3-4b

For each response length N, one request of B = max(1, --tokens // N) responses (prompt N/4,
random ids) is scored through `Scorer.score_batch` (what the server's device thread runs),
then the server's `observe` runs on those results. Both are the fastest of --reps after a
warm-up, measured in the same process; the table prints their ratio. The bar: under 1% of
scoring time. `observe` is numpy on the host and the server runs it on a worker thread after
the answer is sent (off the request path); its cost per token (ns/token) does not depend on
the device, so on a GPU compare it with the GPU's scoring time per token.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np


def _presets() -> dict[str, dict[str, int]]:
    spec = importlib.util.spec_from_file_location(
        "bench_runner", Path(__file__).with_name("runner.py")
    )
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module.PRESETS


def _fastest(fn: Any, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    presets = _presets()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="cpu-small", choices=sorted(presets))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per request (B = tokens // N)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)

    import torch
    import transformers
    from prometheus_client import CollectorRegistry

    from anchorcredit.contract import CreditParams
    from anchorcredit.runner import Scorer
    from anchorcredit.runner.loading import parse_dtype
    from anchorcredit.server.credit_metrics import CreditMetrics

    torch.manual_seed(0)
    shape = presets[args.preset]
    cfg = transformers.Qwen3Config(
        **shape, max_position_embeddings=max(32768, max(args.n)), use_sliding_window=False,
        tie_word_embeddings=False,
    )  # fmt: skip
    dtype = parse_dtype(args.dtype)
    with torch.device(args.device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    scorer = Scorer.from_pretrained(model.eval(), device=args.device, dtype=dtype)
    params = CreditParams(strategy="coupled_rhythm")
    metrics = CreditMetrics(CollectorRegistry())
    rng = np.random.default_rng(0)

    print(f"device={args.device} dtype={args.dtype} preset={args.preset} reps={args.reps}")
    print(
        f"{'N':>6} {'B':>4} {'score ms':>10} {'observe ms':>11} {'us/response':>12} "
        f"{'ns/token':>9} {'ratio':>8}"
    )
    for n in args.n:
        b, p = max(1, args.tokens // n), n // 4
        ids = rng.integers(0, shape["vocab_size"], size=(b, n))
        pairs = scorer.validate([(row[:p].tolist(), row[p:].tolist()) for row in ids])
        results = scorer.score_batch(pairs, params).results

        def score(pairs: list[Any] = pairs) -> None:
            scorer.score_batch(pairs, params)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        score_s = _fastest(score, args.reps)
        observe_s = _fastest(
            lambda results=results: metrics.observe("coupled_rhythm", results), args.reps
        )
        print(
            f"{n:>6} {b:>4} {score_s * 1e3:>10.1f} {observe_s * 1e3:>11.3f} "
            f"{observe_s / b * 1e6:>12.1f} {observe_s / (b * n) * 1e9:>9.1f} "
            f"{observe_s / score_s:>8.2%}"
        )


if __name__ == "__main__":
    main()
