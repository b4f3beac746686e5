"""Host overhead of the span kernel's call and of the credit stage, measured on the CPU.

    python bench/span_host.py                     # this checkout
    PYTHONPATH=<another checkout>/service python bench/span_host.py   # the same, before/after

What a GPU call costs the host besides its launches: planning (plan_packed: checks, tiles,
block tables, launch arguments) for a new batch layout and for a layer of a known one,
reading the outputs back into per-sequence statistics (collect), and the credit stage of a
whole batch (head classes, means, gamma). The tensors live on the CPU and no kernel runs
(the plans are made for an sm_90 target), so the times are Python and torch dispatch only,
the part a GPU cannot hide; the tensor-method reads (.cpu(), .tolist(), .item(), ...)
counted per credit stage are each a host sync on a GPU. Median of --reps, in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

READS = ("cpu", "tolist", "item", "numpy", "__bool__", "__float__", "__int__")


def timed(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def count_reads(fn: Callable[[], object]) -> int:
    counts = []
    saved = {name: getattr(torch.Tensor, name) for name in READS}
    for name, real in saved.items():

        def counted(self, *a, _real=real, **kw):
            counts.append(1)
            return _real(self, *a, **kw)

        setattr(torch.Tensor, name, counted)
    try:
        fn()
    finally:
        for name, real in saved.items():
            setattr(torch.Tensor, name, real)
    return len(counts)


def kernel_rows(batch: int, n: int, reps: int) -> list[tuple[str, float]]:
    from anchorcredit.engine.span import triton_kernel as tk

    hq, hkv, d, prompt = 32, 8, 128, n // 4
    q = torch.zeros(hq, batch * n, d, dtype=torch.bfloat16)
    k = torch.zeros(hkv, batch * n, d, dtype=torch.bfloat16)
    cu = [i * n for i in range(batch + 1)]
    prompts = [prompt] * batch
    kw = dict(check_finite=False, capability=(9, 0))
    layouts = iter(range(10**6))

    def new_layout():  # a layout never seen: the tables are built (a trainer's next batch)
        shift = next(layouts) % (n - prompt - 1) + 1
        tk.plan_packed(q, k, cu, [prompt + shift] + prompts[1:], **kw)

    plan = tk.plan_packed(q, k, cu, prompts, **kw)
    for name in ("lse", "span", "span_row", "waad", "fai"):  # never written: no kernel runs
        if isinstance(getattr(plan, name, None), torch.Tensor):
            getattr(plan, name).zero_()
    return [
        (f"plan_packed, new layout ({batch} x {n})", timed(new_layout, reps)),
        (f"plan_packed, known layout ({batch} x {n})", timed(
            lambda: tk.plan_packed(q, k, cu, prompts, **kw), reps)),
        (f"collect ({batch} x {n})", timed(plan.collect, reps)),
    ]  # fmt: skip


def credit_rows(batch: int, reps: int) -> list[tuple[str, float]]:
    from anchorcredit.backend import TokenPair
    from anchorcredit.contract import CreditParams
    from anchorcredit.engine import SpanStats
    from anchorcredit.runner import credit_stage

    layers, hq, r = [12, 15, 18, 21, 24], 32, 768
    gen = torch.Generator().manual_seed(0)
    pairs = [TokenPair(np.arange(256) % 100, np.arange(r) % 100, 100) for _ in range(batch)]
    params = CreditParams.build("coupled_rhythm")

    def one() -> SpanStats:
        return SpanStats(torch.rand(hq, generator=gen), torch.rand(hq, r, generator=gen),
                         torch.rand(hq, r, generator=gen))  # fmt: skip

    stats = [[one() for _ in layers] for _ in range(batch)]
    if hasattr(credit_stage, "credit_results"):  # one call for the batch
        from anchorcredit.engine import PackedStats

        packed = [PackedStats.of_sequences([seq[j] for seq in stats]) for j in range(len(layers))]

        def run():
            credit_stage.credit_results(pairs, packed, None, params, layers, "v")
    else:  # one call per sequence

        def run():
            for b, pair in enumerate(pairs):
                credit_stage.credit_result(pair, stats[b], None, params, layers, "v")

    return [
        (f"credit stage ({batch} x {r}-token responses, 5 layers)", timed(run, reps)),
        (f"  its host reads (a sync each on a GPU), {batch} sequences", float(count_reads(run))),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import anchorcredit

    print(f"anchorcredit from {anchorcredit.__file__}, torch {torch.__version__}, "
          f"{args.threads} thread(s), median of {args.reps}\n")  # fmt: skip
    print("| what | us (reads: count) |\n|---|---:|")
    rows = kernel_rows(1, 1024, args.reps) + kernel_rows(512, 1024, max(3, args.reps // 4))
    rows += credit_rows(16, args.reps) + credit_rows(512, 3)
    for name, value in rows:
        print(f"| {name} | {value:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
