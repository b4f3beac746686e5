"""Client latency: cache hit (in-process LRU, Redis) vs a service call, on loopback.

    python bench/client.py [--batch 64] [--prompt 64] [--response 256] [--repeats 5]
                           [--redis-port 0]   # 0: start a private redis-server if installed

Starts a CreditServer on 127.0.0.1 with the tiny debug model (CPU, float32) in this process,
scores one batch of random token ids and prints a Markdown table of median wall times per
`CreditClient.score` call. The service row is compute-bound on the debug model; a real model
only makes it slower, while hit latency stays the same.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from inproc_server import start_server_thread  # bench/inproc_server.py (the script's folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--redis-port", type=int, default=0)
    args = ap.parse_args()

    from tiny_model import save_debug_model  # tests/support/debug_model.py

    from anchorcredit.client import CreditClient

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, args.prompt).tolist() for _ in range(args.batch)]
    responses = [rng.integers(3, 256, args.response).tolist() for _ in range(args.batch)]
    redis_proc = None
    with tempfile.TemporaryDirectory() as tmp:
        target, stop = start_server_thread(save_debug_model(Path(tmp) / "llama"))
        try:
            redis_url = None
            if args.redis_port:
                redis_url = f"redis://127.0.0.1:{args.redis_port}/0"
            elif shutil.which("redis-server"):
                port = _free_port()
                redis_proc = subprocess.Popen(
                    [
                        "redis-server",
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ],
                    stdout=subprocess.DEVNULL,
                )
                time.sleep(0.3)
                redis_url = f"redis://127.0.0.1:{port}/0"

            rows = []
            with CreditClient([target], cache=False) as c:
                rows.append(
                    (
                        "service call (no cache)",
                        _time(lambda: c.score(prompts, responses), args.repeats),
                    )
                )
            with CreditClient([target], cache=None) as c:
                c.score(prompts, responses)
                rows.append(
                    ("in-process LRU hit", _time(lambda: c.score(prompts, responses), args.repeats))
                )
            if redis_url:
                with CreditClient([target], cache=redis_url) as c:
                    c.score(prompts, responses)
                    rows.append(
                        (
                            "Redis hit (loopback)",
                            _time(lambda: c.score(prompts, responses), args.repeats),
                        )
                    )
        finally:
            stop()
            if redis_proc is not None:
                redis_proc.kill()
                redis_proc.wait()

    print(
        f"batch {args.batch} x (prompt {args.prompt} + response {args.response}) tokens, "
        f"debug llama (6 layers, hidden 64), CPU float32, median of {args.repeats}; "
        f"python {sys.version.split()[0]}"
    )
    print()
    print("| path | ms / call | ms / sequence | vs service |")
    print("|---|---:|---:|---:|")
    base = rows[0][1]
    for name, t in rows:
        print(f"| {name} | {t * 1e3:.2f} | {t * 1e3 / args.batch:.3f} | {base / t:.0f}x |")


if __name__ == "__main__":
    main()
