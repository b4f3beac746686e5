"""Service benchmark: loopback gRPC load vs calling the runner in-process, same run.

    python bench/service.py                       # tiny debug model, 8 clients x 25 requests
    python bench/service.py --model DIR --device cuda --clients 16 --requests 400

1. in-process: `Scorer.score()` once per request, one after another (what a trainer would
   do without the service), then once over all requests at once (the packing upper bound);
2. service: `anchorcredit serve` as a subprocess on 127.0.0.1, N concurrent grpc.aio clients
   sending a fixed number of requests (each client waits for its answer before the next).
Prints a markdown table: throughput, p50/p99 latency, the ratio service / in-process, and
the server's mean batch size (from its /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from anchorcredit.server.config import DEFAULT_LIMITS

ROOT = Path(__file__).resolve().parents[1]


def make_requests(n: int, seqs: int, prompt: int, response: int, vocab: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [
        [
            (rng.integers(0, vocab, prompt).tolist(), rng.integers(0, vocab, response).tolist())
            for _ in range(seqs)
        ]
        for _ in range(n)
    ]


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies) * 1000.0, q))


def bench_inprocess(model: str, device: str, requests: list, max_batch_tokens: int) -> dict:
    from anchorcredit.runner import Scorer

    scorer = Scorer.from_pretrained(model, device=device, dtype="float32")
    scorer.score(requests[0])  # warm-up
    lat = []
    t0 = time.perf_counter()
    for pairs in requests:
        t = time.perf_counter()
        scorer.score(pairs)
        lat.append(time.perf_counter() - t)
    sequential = time.perf_counter() - t0
    from anchorcredit.budget import greedy_chunks

    every = [p for pairs in requests for p in pairs]
    t0 = time.perf_counter()
    for idx in greedy_chunks([len(p) + len(r) for p, r in every], max_batch_tokens):
        scorer.score([every[i] for i in idx])  # budget-sized forwards, as the batcher sends
    packed = time.perf_counter() - t0
    return {
        "sequential_s": sequential,
        "latencies": lat,
        "packed_s": packed,
        "vocab": scorer.vocab_size,
    }


def start_server(model: str, device: str, args: argparse.Namespace) -> tuple:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-c",
        "import sys; from anchorcredit.cli import main; sys.exit(main())",
        "serve",
        "--model",
        model,
        "--device",
        device,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--max-batch-tokens",
        str(args.max_batch_tokens),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--max-queue",
        str(max(DEFAULT_LIMITS.max_queue, args.clients * 4)),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    threading.Thread(
        target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True
    ).start()
    deadline = time.monotonic() + 300
    ports = None
    while time.monotonic() < deadline and proc.poll() is None:
        text = "".join(lines)
        m = re.search(r"gRPC on 127\.0\.0\.1:(\d+) .* metrics on 127\.0\.0\.1:(\d+)", text)
        if m and "loaded in" in text:
            ports = int(m.group(1)), int(m.group(2))
            break
        time.sleep(0.05)
    if ports is None:
        proc.kill()
        raise SystemExit("server did not start:\n" + "".join(lines))
    return proc, ports


async def load(port: int, requests: list, clients: int) -> tuple[float, list[float]]:
    import grpc

    from anchorcredit.v1 import credit_pb2 as pb
    from anchorcredit.v1 import credit_pb2_grpc

    msgs = [
        pb.ScoreRequest(sequences=[pb.Sequence(prompt_ids=p, response_ids=r) for p, r in pairs])
        for pairs in requests
    ]
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = credit_pb2_grpc.CreditServiceStub(channel)
        await stub.Score(msgs[0], timeout=120)  # warm-up / connect

        async def client(mine: list) -> None:
            for msg in mine:
                t = time.perf_counter()
                await stub.Score(msg, timeout=300)
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(msgs[i::clients]) for i in range(clients)))
        return time.perf_counter() - t0, latencies


def scrape_mean_batch(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    values = {}
    for name in ("anchorcredit_batch_size_sum", "anchorcredit_batch_size_count"):
        m = re.search(rf"^{name} (\S+)$", text.decode(), re.M)
        values[name] = float(m.group(1)) if m else 0.0
    return values["anchorcredit_batch_size_sum"] / max(values["anchorcredit_batch_size_count"], 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: a tiny debug Llama)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--sequences", type=int, default=4, help="sequences per request")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--response", type=int, default=96)
    # The server's own defaults (server/config.py), so the bench measures what `serve` runs.
    ap.add_argument("--max-batch-tokens", type=int, default=DEFAULT_LIMITS.max_batch_tokens)
    ap.add_argument("--max-wait-ms", type=float, default=DEFAULT_LIMITS.max_wait_s * 1000.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from tiny_model import save_debug_model  # tests/support/debug_model.py

            model = str(save_debug_model(Path(tmp) / "llama", arch="llama"))
        from anchorcredit.runner import Scorer

        vocab = Scorer.from_pretrained(model, device=args.device).vocab_size
        requests = make_requests(
            args.requests, args.sequences, args.prompt, args.response, vocab, args.seed
        )
        tokens = args.requests * args.sequences * (args.prompt + args.response)
        base = bench_inprocess(model, args.device, requests, args.max_batch_tokens)
        proc, (port, metrics_port) = start_server(model, args.device, args)
        try:
            wall, lat = asyncio.run(load(port, requests, args.clients))
            mean_batch = scrape_mean_batch(metrics_port)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    rows = [
        ("in-process, one request at a time", base["sequential_s"], base["latencies"]),
        ("in-process, all requests in one call", base["packed_s"], None),
        (f"service, {args.clients} concurrent clients", wall, lat),
    ]
    print(
        f"model={'debug-llama' if args.model is None else args.model} device={args.device} "
        f"requests={args.requests} x {args.sequences} seqs x ({args.prompt}+{args.response}) "
        f"tokens = {tokens} tokens; cores={os.cpu_count()}"
    )
    print("| mode | wall s | req/s | tokens/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds, latencies in rows:
        p50 = f"{percentile_ms(latencies, 50):.1f}" if latencies else "-"
        p99 = f"{percentile_ms(latencies, 99):.1f}" if latencies else "-"
        print(
            f"| {name} | {seconds:.2f} | {args.requests / seconds:.1f} | "
            f"{tokens / seconds:.0f} | {p50} | {p99} |"
        )
    print(f"\nservice / in-process (one at a time) throughput: {base['sequential_s'] / wall:.2f}x")
    print(f"service / in-process (all in one call) throughput: {base['packed_s'] / wall:.2f}x")
    print(f"server mean batch size: {mean_batch:.2f} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
