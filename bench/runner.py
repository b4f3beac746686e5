"""Runner benchmark: scoring vs a bare truncated forward vs the eager output_attentions pipeline.

    python bench/runner.py                                 # CPU, small random Qwen3 shape
    python bench/runner.py --device cuda --dtype bfloat16 --preset qwen3-4b --n 1024 4096 8192

Three methods, each on B = max(1, tokens // N) random sequences of N tokens (prompt N/4):
  bare    transformers' SDPA forward of the same model truncated after the last selected
          layer (num_hidden_layers cut), batch [B, N]: no statistics, the floor.
  runner  Scorer.score(..., strategy="coupled_rhythm"): packed forward, q/k capture, span
          statistics, head classes, gamma (everything a request costs).
  eager   the paper-style pass: eager attention with output_attentions=True (same truncated
          model), attention matrices of the selected layers -> engine.reference
          stats_from_attention -> aggregate -> credit.
Each (method, N) runs in a fresh child process so peak memory is its own: on CUDA
torch.cuda.max_memory_allocated, on CPU the peak RSS (VmHWM, reset through
/proc/self/clear_refs) minus the RSS before the first call, i.e. what the method needs on
top of the loaded weights. Time is the fastest of --reps calls after one warm-up.
Weights are random (a Qwen3-shaped model; speed does not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

PRESETS: dict[str, dict[str, int]] = {
    # small enough for 2 CPU cores
    "cpu-small": dict(
        num_hidden_layers=12, hidden_size=512, intermediate_size=1536,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=32000,
    ),
    # real shapes (random weights) for GPU runs
    "qwen3-0.6b": dict(
        num_hidden_layers=28, hidden_size=1024, intermediate_size=3072,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
    ),
    "qwen3-4b": dict(
        num_hidden_layers=36, hidden_size=2560, intermediate_size=9728,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
    ),
    "qwen3-8b": dict(
        num_hidden_layers=36, hidden_size=4096, intermediate_size=12288,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
    ),
}  # fmt: skip
METHODS = ("bare", "runner", "eager")


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    return _rss_bytes("VmRSS")


def _peak(device: str, base: int) -> int:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _rss_bytes("VmHWM") - base


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One (method, N) measurement in this process."""
    import numpy as np
    import torch
    import transformers

    from anchorcredit import Scorer
    from anchorcredit.engine import aggregate, credit
    from anchorcredit.engine.span.reference import stats_from_attention
    from anchorcredit.runner import select_layers
    from anchorcredit.runner.loading import parse_dtype

    torch.manual_seed(0)
    shape = PRESETS[args.preset]
    layers = select_layers(shape["num_hidden_layers"])
    dtype = parse_dtype(args.dtype)
    cfg = transformers.Qwen3Config(
        **shape, max_position_embeddings=max(32768, args.n), use_sliding_window=False,
        tie_word_embeddings=False,
    )  # fmt: skip
    if args.method != "runner":  # the baselines run truncated after the last selected layer
        cfg.num_hidden_layers = layers[-1] + 1
    with torch.device(args.device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval().requires_grad_(False)
    b = max(1, args.tokens // args.n)
    p = args.n // 4
    rng = np.random.default_rng(0)
    ids = rng.integers(0, shape["vocab_size"], size=(b, args.n))
    pairs = [(row[:p].tolist(), row[p:].tolist()) for row in ids]
    ids_t = torch.from_numpy(ids).to(args.device)

    if args.method == "runner":
        scorer = Scorer.from_pretrained(model, device=args.device, dtype=dtype)

        def step() -> None:
            scorer.score(pairs, strategy="coupled_rhythm")
    elif args.method == "bare":
        model.set_attn_implementation("sdpa")
        decoder = model.get_decoder()

        def step() -> None:
            with torch.inference_mode():
                decoder(input_ids=ids_t, use_cache=False)
    else:
        model.set_attn_implementation("eager")
        decoder = model.get_decoder()

        def step() -> None:
            with torch.inference_mode():
                out = decoder(input_ids=ids_t, use_cache=False, output_attentions=True)
                for i in range(b):
                    stats = [
                        stats_from_attention(out.attentions[layer][i].float(), p, 10, 10, 100)
                        for layer in layers
                    ]
                    agg = aggregate(stats, 0.3, layer_ids=layers)
                    credit("coupled_rhythm", waad=agg.waad, fai=agg.fai)

    try:
        dt, peak = _time_steps(step, args.device, args.reps)
    except torch.OutOfMemoryError:
        return {"method": args.method, "n": args.n, "batch": b, "oom": True}
    return {
        "method": args.method, "n": args.n, "batch": b, "seconds": dt,
        "tokens_per_s": b * args.n / dt, "peak_bytes": peak, "oom": False,
    }  # fmt: skip


def _time_steps(step: Any, device: str, reps: int) -> tuple[float, int]:
    """The fastest of `reps` calls after a warm-up, and the peak memory they took."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    # Peak memory counts from before the first call (the allocator keeps what a warm-up
    # took, so measuring after it would only see growth beyond it).
    base = _reset_peak(device)
    step()  # warm-up (allocator, kernels)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times), _peak(device, base)  # min: the least disturbed run on a shared machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    ap.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048], help="sequence lengths")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per step (B = tokens // N)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        args.n = args.n[0]
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(worker(args)))
        return

    rows = []
    for n in args.n:
        for method in args.methods:
            cmd = [
                sys.executable, __file__, "--worker", "--method", method, "--n", str(n),
                "--preset", args.preset, "--tokens", str(args.tokens), "--device", args.device,
                "--dtype", args.dtype, "--reps", str(args.reps), "--threads", str(args.threads),
            ]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                rows.append({"method": method, "n": n, "batch": "?", "oom": True, "error": True})
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)

    print(
        f"\npreset={args.preset} device={args.device} dtype={args.dtype} tokens/step={args.tokens}"
    )
    print("| N | B | method | tokens/s | peak MiB | time x bare | memory x bare |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for n in args.n:
        bare = next(
            (r for r in rows if r["n"] == n and r["method"] == "bare" and not r["oom"]), None
        )
        for r in (r for r in rows if r["n"] == n):
            if r["oom"]:
                what = "error" if r.get("error") else "OOM"
                print(f"| {n} | {r['batch']} | {r['method']} | {what} | | | |")
                continue
            mib = r["peak_bytes"] / 2**20
            tx = f"{r['seconds'] / bare['seconds']:.2f}" if bare else "-"
            mx = f"{r['peak_bytes'] / max(1, bare['peak_bytes']):.2f}" if bare else "-"
            tps = f"{r['tokens_per_s']:.0f}"
            print(f"| {n} | {r['batch']} | {r['method']} | {tps} | {mib:.0f} | {tx} | {mx} |")


if __name__ == "__main__":
    main()
