#!/usr/bin/env python
"""Chaos run (issue 12): real servers on loopback under load while things break.

Two `anchorcredit serve` processes (targets A and B, the tiny debug model on the CPU unless
--model) and a private redis-server, all on 127.0.0.1. `--callers` threads score requests
from a fixed pool of inputs (half of them through the Redis cache, half without) until
`--requests` calls were made, each answer checked against a reference scored before the
chaos. Meanwhile, at fixed fractions of the run:

    10 %  server A is SIGKILLed and started again (callers fail over to B)
    30 %  redis-server is killed, and started again 1 s later on the same port
    50 %  new weights (the same tensors under a new version) are pushed to both servers
    70 %  a burst of --burst-x times the queue (--max-queue) is released at once
    all   garbage: bad frames (unary and stream) and bad inputs to B, each expecting a
          clear INVALID_ARGUMENT; a health probe of every live server every 100 ms

It prints one markdown table: requests, lost (a call that failed after the client's
retries), wrong (an answer that differs from the reference), failures by status code, bad
inputs by status code, crashes (a server process that exited unasked), health (slowest
answer, misses over 1 s), p50/p99 latency, server RSS before/after.

    python bench/chaos.py                       # 10,000 requests, 32 callers, a few minutes
    python bench/chaos.py --requests 500 --callers 8    # a quick look

Everything is bounded: --deadline-s ends the run (calls still out count as lost).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

SERVICE = "anchorcredit.v1.CreditService"
ADMIN_TOKEN = "chaos-admin-token"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000, help="score calls in all")
    p.add_argument("--callers", type=int, default=32, help="caller threads")
    p.add_argument("--pool", type=int, default=128, help="distinct inputs")
    p.add_argument("--max-queue", type=int, default=8, help="each server's --max-queue")
    p.add_argument("--burst-x", type=int, default=50, help="burst size = this x --max-queue")
    p.add_argument("--garbage-every-s", type=float, default=0.05, help="bad input interval")
    p.add_argument("--model", default=None, help="model dir (default: a fresh debug model)")
    p.add_argument("--deadline-s", type=float, default=900.0, help="whole run bound")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.requests < 1 or args.callers < 1 or args.pool < 1 or args.max_queue < 1:
        p.error("--requests, --callers, --pool and --max-queue must be >= 1")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class Redis:
    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed (apt-get install -y redis-server)")
        self.exe, self.port, self.workdir = exe, free_port(), workdir
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        cmd = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "no", "--dir", str(self.workdir)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, 10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Server:
    """One `anchorcredit serve` process on 127.0.0.1:<port>."""

    def __init__(self, name: str, model: str, max_queue: int, log_dir: Path) -> None:
        self.name, self.model, self.max_queue = name, model, max_queue
        self.port = free_port()
        self.log = log_dir / f"server-{name}.log"
        self.proc: subprocess.Popen | None = None
        self.killed_by_us = False
        self.lives = 0
        self.rss_start = float("nan")  # MiB once serving (this life)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, env: dict[str, str]) -> None:
        cmd = [sys.executable, "-m", "anchorcredit.cli", "serve", "--model", self.model]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", "-1"]
        cmd += ["--device", "cpu", "--dtype", "float32", "--max-queue", str(self.max_queue)]
        cmd += ["--log-level", "WARNING"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        self.killed_by_us = False
        self.lives += 1

    def wait_ready(self, timeout: float = 120.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"server {self.name} exited; see {self.log}")
                with contextlib.suppress(grpc.RpcError):
                    got = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                    if got.status == health_pb2.HealthCheckResponse.SERVING:
                        assert self.proc is not None
                        self.rss_start = rss_mib(self.proc.pid)
                        return
                time.sleep(0.1)
        raise RuntimeError(f"server {self.name} not SERVING after {timeout:.0f} s")

    def sigkill(self) -> None:
        assert self.proc is not None
        self.killed_by_us = True
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.killed_by_us = True
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclasses.dataclass
class Tally:
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    started: int = 0
    ok: int = 0
    wrong: int = 0
    lost: Counter = dataclasses.field(default_factory=Counter)  # status code -> calls
    latencies: list[float] = dataclasses.field(default_factory=list)
    bad_inputs: Counter = dataclasses.field(default_factory=Counter)  # status -> count
    health_max_s: float = 0.0
    health_misses: int = 0
    health_checks: int = 0
    events: list[str] = dataclasses.field(default_factory=list)

    def take(self, limit: int | None, more: threading.Event | None = None) -> bool:
        """Count one call about to be made; False once `limit` calls were made and `more`
        (the events still running) is not set. limit None: always."""
        with self.lock:
            if limit is not None and self.started >= limit and not (more and more.is_set()):
                return False
            self.started += 1
            return True

    @property
    def done(self) -> int:
        with self.lock:
            return self.ok + self.wrong + sum(self.lost.values())


def make_pool(n: int, seed: int, vocab: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = rng.integers(0, vocab, int(rng.integers(4, 12))).tolist()
        response = rng.integers(0, vocab, int(rng.integers(8, 24))).tolist()
        out.append((prompt, response))
    return out


def client_kwargs() -> dict[str, Any]:
    """An admin token for the weight push where this client version takes one."""
    from anchorcredit.client import CreditClient

    params = inspect.signature(CreditClient.__init__).parameters
    return {"admin_token": ADMIN_TOKEN} if "admin_token" in params else {}


def server_env() -> dict[str, str]:
    from anchorcredit.server.config import ServeConfig

    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    if "admin_token" in {f.name for f in dataclasses.fields(ServeConfig)}:
        env["ANCHORCREDIT_ADMIN_TOKEN"] = ADMIN_TOKEN
    return env


def same(got: Any, want: Any) -> bool:
    return all(
        np.allclose(getattr(got, n), getattr(want, n), rtol=1e-4, atol=1e-5)
        for n in ("waad", "fai", "gamma")
    )


def caller(
    idx: int,
    targets: list[str],
    cache: str | bool,
    pool: list,
    ref: list,
    tally: Tally,
    limit: int,
    stop: threading.Event,
    seed: int,
    events_running: threading.Event,
) -> None:
    from anchorcredit.client import CreditClient, CreditServiceError

    rng = np.random.default_rng(seed + idx)
    with CreditClient(targets, cache=cache) as client:
        while not stop.is_set() and tally.take(limit, events_running):
            one_call(client, pool, ref, tally, int(rng.integers(len(pool))), CreditServiceError)


def one_call(client: Any, pool: list, ref: list, tally: Tally, i: int, error: type) -> None:
    t0 = time.perf_counter()
    try:
        got = client.score([pool[i][0]], [pool[i][1]])[0]
    except error as exc:
        with tally.lock:
            tally.lost[exc.code.name] += 1
        return
    except Exception as exc:  # anything else is a lost call too, named by its type
        with tally.lock:
            tally.lost[type(exc).__name__] += 1
        return
    seconds = time.perf_counter() - t0
    with tally.lock:
        tally.latencies.append(seconds)
        if same(got, ref[i]):
            tally.ok += 1
        else:
            tally.wrong += 1


def garbage(target: str, good: bytes, tally: Tally, stop: threading.Event, every: float) -> None:
    """Bad frames and bad inputs, one every `every` seconds; each should get a clear
    INVALID_ARGUMENT."""
    import grpc

    from anchorcredit.v1 import credit_pb2 as pb

    def req(**kw: Any) -> bytes:
        base = pb.ScoreRequest.FromString(good)
        for k, v in kw.items():
            if k == "sequences":
                del base.sequences[:]
                base.sequences.extend(v)
            elif k == "q":
                base.params.q = v
            else:
                setattr(base, k, v)
        return base.SerializeToString()

    bad_unary = [
        b"\xff\xff\xff\xff",
        b"garbage bytes, not a protobuf",
        os.urandom(64),
        req(strategy="no-such-strategy"),
        req(q=2.0),
        req(sequences=[pb.Sequence(prompt_ids=[1, 2], response_ids=[10**6])]),
        req(sequences=[pb.Sequence(prompt_ids=[1, 2], response_ids=[])]),
        req(sequences=[]),
    ]
    with grpc.insecure_channel(target) as ch:
        unary = ch.unary_unary(f"/{SERVICE}/Score", request_serializer=None)
        stream = ch.stream_stream(f"/{SERVICE}/ScoreStream", request_serializer=None)
        n = 0
        while not stop.wait(every):
            n += 1
            kind = n % (len(bad_unary) + 1)
            try:
                if kind == len(bad_unary):  # [good, garbage, good] on one stream
                    for _ in stream(iter([good, b"\xff\xff\xff", good]), timeout=30):
                        pass
                    code = "OK"
                else:
                    unary(bad_unary[kind], timeout=30)
                    code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
            with tally.lock:
                tally.bad_inputs[code] += 1


def health(servers: list[Server], down: set[str], tally: Tally, stop: threading.Event) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channels = {s.name: grpc.insecure_channel(s.target) for s in servers}
    stubs = {k: health_pb2_grpc.HealthStub(c) for k, c in channels.items()}
    try:
        while not stop.wait(0.1):
            for s in servers:
                if s.name in down:
                    continue
                t0 = time.perf_counter()
                try:
                    stubs[s.name].Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    ok = True
                except grpc.RpcError:
                    ok = s.name in down  # it went down while we asked
                seconds = time.perf_counter() - t0
                with tally.lock:
                    tally.health_checks += 1
                    tally.health_max_s = max(tally.health_max_s, seconds)
                    if not ok or seconds > 1.0:
                        tally.health_misses += 1
    finally:
        for c in channels.values():
            c.close()


def chaos(events_running: threading.Event, *event_args: Any) -> None:
    """The events, at fractions of the requests done (callers go on until they ended);
    `events_running` is cleared when they are over, whatever happened."""
    try:
        _events(*event_args)
    finally:
        events_running.clear()


def _events(
    args: argparse.Namespace,
    servers: list[Server],
    redis: Redis,
    model: str,
    env: dict[str, str],
    pool: list,
    ref: list,
    tally: Tally,
    down: set[str],
    stop: threading.Event,
) -> None:
    from anchorcredit.client import CreditClient, CreditServiceError

    a, b = servers
    targets = [s.target for s in servers]

    def at(fraction: float) -> bool:
        while not stop.is_set():
            if tally.done >= fraction * args.requests:
                return True
            time.sleep(0.05)
        return False

    def note(msg: str) -> None:
        tally.events.append(f"{tally.done:>6}  {msg}")

    if not at(0.10):
        return
    down.add(a.name)
    a.sigkill()
    note(f"SIGKILL server A (pid {a.proc.pid if a.proc else '?'})")
    a_back = threading.Event()

    def restart() -> None:  # in the background: the other events go on meanwhile
        a.start(env)
        a.wait_ready()
        down.discard(a.name)
        note("server A serving again")
        a_back.set()

    threading.Thread(target=restart, daemon=True).start()

    if not at(0.30):
        return
    redis.kill()
    note("redis-server killed")
    time.sleep(1.0)
    redis.start()
    note("redis-server started again")

    if not at(0.50):
        return
    while not a_back.wait(0.1):  # the push goes to every server: A must be back
        if stop.is_set():
            return
    from safetensors.numpy import load_file

    state: dict[str, Any] = {}
    for f in sorted(Path(model).glob("*.safetensors")):
        state.update(load_file(str(f)))
    with CreditClient(targets, cache=False, **client_kwargs()) as admin:
        try:
            admin.push_weights(state, "chaos-v1")
            note("weights pushed to A and B (version chaos-v1)")
        except CreditServiceError as exc:
            note(f"weight push FAILED: {exc.code.name}: {exc}")

    if not at(0.70):
        return
    size = args.burst_x * args.max_queue
    go = threading.Barrier(size + 1)
    with CreditClient(targets, cache=False) as burst_client:
        from anchorcredit.client import CreditServiceError as err_type

        def one(i: int) -> None:
            go.wait()
            if tally.take(None):  # the burst always goes out, on top of the callers'
                one_call(burst_client, pool, ref, tally, i % len(pool), err_type)

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(size)]
        for t in threads:
            t.start()
        go.wait()
        note(f"burst of {size} calls released ({args.burst_x} x queue {args.max_queue})")
        for t in threads:
            t.join()
    note("burst done")


def table(
    tally: Tally,
    servers: list[Server],
    rss: dict[str, tuple[float, float]],
    crashes: int,
    wall: float,
    args: argparse.Namespace,
) -> str:
    lat = np.array(tally.latencies) if tally.latencies else np.array([float("nan")])
    made = tally.ok + tally.wrong + sum(tally.lost.values())
    unanswered = tally.started - made
    lost = sum(tally.lost.values()) + unanswered
    fails = ", ".join(f"{k} {v}" for k, v in sorted(tally.lost.items())) or "none"
    bad = ", ".join(f"{k} {v}" for k, v in sorted(tally.bad_inputs.items())) or "none"
    rows = [
        ("requests", f"{tally.started} from {args.callers} callers + burst, in {wall:.0f} s"),
        ("lost", f"{lost}" + (f" ({unanswered} unanswered at the deadline)" if unanswered else "")),
        ("wrong", f"{tally.wrong}"),
        ("failures by status code (after client retries)", fails),
        ("bad inputs by status code", bad),
        ("crashes (server exits we did not cause)", f"{crashes}"),
        (
            "health (every 100 ms, live servers)",
            f"{tally.health_checks} checks, slowest {tally.health_max_s * 1000:.0f} ms, "
            f"{tally.health_misses} over 1 s or failed",
        ),
        (
            "latency p50 / p99",
            f"{np.percentile(lat, 50) * 1000:.0f} ms / {np.percentile(lat, 99) * 1000:.0f} ms",
        ),
    ]
    for s in servers:
        before, after = rss[s.name]
        life = "since its restart" if s.lives > 1 else "whole run"  # ready -> end
        rows.append(
            (f"server {s.name} RSS before / after ({life})", f"{before:.0f} MiB / {after:.0f} MiB")
        )
    out = ["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from anchorcredit.client import CreditClient
    from anchorcredit.v1 import credit_pb2 as pb

    with tempfile.TemporaryDirectory(prefix="anchorcredit-chaos-") as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            from anchorcredit.offline.debug_model import save_debug_model

            model = str(save_debug_model(work / "model", arch="llama"))
        env = server_env()
        redis = Redis(work)
        servers = [Server(n, model, args.max_queue, work) for n in ("A", "B")]
        tally, stop, down = Tally(), threading.Event(), set()
        running = threading.Event()  # the events are under way: callers keep calling
        running.set()
        threads: list[threading.Thread] = []
        rss: dict[str, tuple[float, float]] = {}
        try:
            for s in servers:
                s.start(env)
            for s in servers:
                s.wait_ready()
            targets = [s.target for s in servers]
            with CreditClient(targets, cache=False) as c:
                vocab = int(c.model_info().vocab_size)
                pool = make_pool(args.pool, args.seed, vocab)
                ref = c.score([p for p, _ in pool], [r for _, r in pool])
                good = pb.ScoreRequest(
                    sequences=[pb.Sequence(prompt_ids=pool[0][0], response_ids=pool[0][1])]
                ).SerializeToString()
            t0 = time.monotonic()
            for i in range(args.callers):
                cache: str | bool = redis.url if i % 2 == 0 else False
                threads.append(
                    threading.Thread(
                        target=caller,
                        args=(
                            i,
                            targets,
                            cache,
                            pool,
                            ref,
                            tally,
                            args.requests,
                            stop,
                            args.seed,
                            running,
                        ),
                        daemon=True,
                    )
                )
            side = [
                threading.Thread(
                    target=garbage,
                    args=(servers[1].target, good, tally, stop, args.garbage_every_s),
                    daemon=True,
                ),
                threading.Thread(target=health, args=(servers, down, tally, stop), daemon=True),
            ]
            events = threading.Thread(
                target=chaos,
                args=(running, args, servers, redis, model, env, pool, ref, tally, down, stop),
                daemon=True,
            )
            for t in [*threads, *side, events]:
                t.start()
            deadline = t0 + args.deadline_s
            for t in [*threads, events]:
                t.join(max(0.0, deadline - time.monotonic()))
            stop.set()
            for t in side:
                t.join(30)
            wall = time.monotonic() - t0
            crashes = sum(
                1
                for s in servers
                if s.proc is not None and s.proc.poll() is not None and not s.killed_by_us
            )
            for s in servers:
                now = rss_mib(s.proc.pid) if s.proc and s.proc.poll() is None else float("nan")
                rss[s.name] = (s.rss_start, now)
            print("events (calls done, event):")
            for e in tally.events:
                print("  " + e)
            print()
            print(table(tally, servers, rss, crashes, wall, args))
            bad_ok = set(tally.bad_inputs) <= {"INVALID_ARGUMENT"}
            clean = (
                tally.wrong == 0
                and not tally.lost
                and tally.started == tally.done
                and crashes == 0
                and bad_ok
                and tally.health_misses == 0
            )
            return 0 if clean else 1
        finally:
            stop.set()
            for s in servers:
                s.stop()
            redis.kill()


if __name__ == "__main__":
    sys.exit(main())
