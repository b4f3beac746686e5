"""Engine benchmark: chunked vs reference span_stats, time and peak memory, one run.

    python bench/engine.py                      # N in 1K..8K, 4 q heads / 2 kv heads, d=64
    python bench/engine.py --sizes 1024 2048 --heads 8 --kv-heads 2

Each measurement runs in a fresh process so its peak resident memory (ru_maxrss minus the
resident size before the call) belongs to that call alone. Ratios compare the two backends
measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import json, resource, sys, time, torch
    from anchorcredit.engine import span_stats
    backend, n, hq, hkv, d, reps, threads = sys.argv[1], *map(int, sys.argv[2:])
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(hq, n, d, generator=gen), torch.randn(hkv, n, d, generator=gen)
    prompt = n // 8
    span_stats(q[:, :128], k[:, :128], 16, backend=backend)  # warm-up
    def rss_kib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
    before = rss_kib()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        span_stats(q, k, prompt, backend=backend)
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    median = sorted(times)[len(times) // 2]
    print(json.dumps({"seconds": median, "extra_mib": (peak - before) / 1024}))
    """
)


def measure(backend: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-c", PROBE, backend, str(n), str(args.heads), str(args.kv_heads),
           str(args.head_dim), str(args.reps), str(args.threads)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    print(f"# span_stats, float32, Hq={args.heads} Hkv={args.kv_heads} d={args.head_dim}, "
          f"prompt = N/8, {args.threads} threads, median of {args.reps}")  # fmt: skip
    header = ("N", "reference s", "chunked s", "speed-up", "reference MiB", "chunked MiB", "mem")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for n in args.sizes:
        ref, chk = measure("reference", n, args), measure("chunked", n, args)
        if "error" in ref or "error" in chk:
            print(f"| {n} | {ref.get('error', '')} {chk.get('error', '')} |")
            continue
        print(
            f"| {n} | {ref['seconds']:.3f} | {chk['seconds']:.3f} | "
            f"{ref['seconds'] / chk['seconds']:.1f}x | {ref['extra_mib']:.0f} | "
            f"{chk['extra_mib']:.0f} | {ref['extra_mib'] / max(chk['extra_mib'], 1):.1f}x |"
        )


if __name__ == "__main__":
    main()
