#!/usr/bin/env python
"""Chaos run (issues 12 and 22): real servers on loopback under load while things break.

Two `anchorcredit serve` processes (targets A and B: the tiny debug model with 8K positions
on the CPU, TLS, a scoring token and an admin token) and a private redis-server, all on
127.0.0.1. Exactly `--requests` score calls are made: by `--callers` threads from a pool of
inputs (single short sequences and multi-sequence requests, half of the callers through
the Redis cache), by the burst, and one 8K-token request beside each event. Every answer
names the policy version that computed it and is checked against that version's reference,
scored in this process beforehand from the very weights (three really different weight
sets), so an answer from other weights than its label names is counted wrong. At fixed
fractions of the calls (callers wait at the next fraction until its event has started, so
every event happens under load):

    10 %  server A is SIGKILLed and started again (callers fail over to B)
    20 %  five JoinWeightGroup calls to a port that accepts and never answers (timeout_s 2):
          each must end DEADLINE_EXCEEDED; B must go on serving and take weight pushes
    30 %  redis-server is killed, and started again 1 s later on the same port
    40 %  weights W1 pushed as "chaos-1" to both; then W2 under "0" (W0's label): refused
    55 %  SIGTERM to B under load: it must exit within --grace-s + 5 s; started again (it
          comes back on its checkpoint, version "0": replicas out of step)
    70 %  a burst of --burst-x times the queue (--max-queue) is released at once
    80 %  weights W2 pushed as "chaos-2" to both
    all   garbage on every method (with the tokens it needs), security probes (no token, a
          wrong one, the scoring token on a weight change, plaintext to TLS, a path outside
          --weights-dir), calls with 1-50 ms deadlines; a health probe every 100 ms
    end   SIGTERM to both: each must exit within --grace-s + 5 s

It prints the events and one markdown table: requests, lost (a call that failed after the
client's retries), wrong, hung (calls unanswered at the end, servers that did not exit in
time), answers per version, failures by status code, each probe's codes, exit times,
crashes, health, latency, RSS. Exit status 0 only when all of it is clean.

    python bench/chaos.py                                  # 10,000 requests, 32 callers
    python bench/chaos.py --requests 500 --callers 8       # a quick look

Everything is bounded: --deadline-s ends the run (calls still out count as hung).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
TOKEN, ADMIN = "chaos-scoring-token", "chaos-admin-token"
LONG_TOKENS = 8192  # the 8K request (the debug model is built with this many positions)
LONG, MEDIUM = 0, 1  # pool entries: one 8K-token sequence (sent once per event), 1K tokens
FRACTIONS = (0.10, 0.20, 0.30, 0.40, 0.55, 0.70, 0.80)
VERSIONS = {"0": 0, "chaos-1": 1, "chaos-2": 2}  # label -> weight set


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000, help="score calls in all, exactly")
    p.add_argument("--callers", type=int, default=32, help="caller threads")
    p.add_argument("--pool", type=int, default=128, help="distinct inputs")
    p.add_argument("--max-queue", type=int, default=8, help="each server's --max-queue")
    p.add_argument("--burst-x", type=int, default=50, help="burst size = this x --max-queue")
    p.add_argument("--garbage-every-s", type=float, default=0.05, help="probe interval")
    p.add_argument("--grace-s", type=float, default=5.0, help="each server's --grace-s")
    p.add_argument("--deadline-s", type=float, default=1800.0, help="whole run bound")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None, help="keep the servers' logs here (default: gone)")
    args = p.parse_args(argv)
    if min(args.requests, args.callers, args.max_queue, args.burst_x) < 1:
        p.error("--requests, --callers, --max-queue and --burst-x must be >= 1")
    if args.pool < 4:
        p.error("--pool must be >= 4")
    return args


# ------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
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


def make_pki(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 / localhost signed by it: (ca, cert, key)."""
    if shutil.which("openssl") is None:
        raise SystemExit("openssl is needed for the TLS certificates (apt-get install openssl)")

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=chaos-ca",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))  # fmt: skip
    ssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
        "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
        "-extfile", str(d / "server.ext"), "-out", str(d / "server.pem"))  # fmt: skip
    return d / "ca.pem", d / "server.pem", d / "server.key"


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


@dataclasses.dataclass
class Setup:
    """What every part of the run shares: where things are and how to reach them."""

    work: Path
    model: str
    ca: Path
    cert: Path
    key: Path
    weights_dir: Path
    args: argparse.Namespace

    def client(self, targets: list[str], **kw: Any) -> Any:
        from anchorcredit.client import CreditClient

        kw.setdefault("cache", False)
        kw.setdefault("token", TOKEN)
        return CreditClient(targets, tls=True, root_certificates=str(self.ca), **kw)

    def channel(self, target: str) -> Any:
        import grpc

        creds = grpc.ssl_channel_credentials(self.ca.read_bytes())
        return grpc.secure_channel(target, creds)


class Server:
    """One `anchorcredit serve` process on 127.0.0.1:<port> with TLS and both tokens."""

    def __init__(self, name: str, setup: Setup) -> None:
        self.name, self.setup = name, setup
        self.port = free_port()
        logs = Path(setup.args.log_dir) if setup.args.log_dir else setup.work
        logs.mkdir(parents=True, exist_ok=True)
        self.log = logs / f"server-{name}.log"
        self.proc: subprocess.Popen | None = None
        self.killed_by_us = False
        self.lives = 0
        self.rss_start = float("nan")  # MiB once serving (this life)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        s, a = self.setup, self.setup.args
        cmd = [sys.executable, "-m", "anchorcredit.cli", "serve", "--model", s.model]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", "-1"]
        cmd += ["--device", "cpu", "--dtype", "float32", "--max-queue", str(a.max_queue)]
        cmd += ["--grace-s", str(a.grace_s), "--log-level", "INFO" if a.log_dir else "WARNING"]
        cmd += ["--tls-cert", str(s.cert), "--tls-key", str(s.key)]
        cmd += ["--weights-dir", str(s.weights_dir)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env |= {"ANCHORCREDIT_AUTH_TOKEN": TOKEN, "ANCHORCREDIT_ADMIN_TOKEN": ADMIN}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        self.killed_by_us = False
        self.lives += 1

    def wait_ready(self, timeout: float = 180.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with self.setup.channel(self.target) as ch:
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

    def sigterm(self, bound_s: float) -> float | None:
        """SIGTERM; seconds until it exited, None when it did not within `bound_s` (then
        it is killed)."""
        assert self.proc is not None
        self.killed_by_us = True
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(bound_s)
            return time.monotonic() - t0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.sigterm(30.0)


# ------------------------------------------------------------------------ the inputs


def weight_sets(model: str, n: int, seed: int) -> list[dict[str, Any]]:
    """The checkpoint's tensors, then n - 1 sets of really different weights (each float
    tensor plus noise of 20 % of its spread)."""
    import torch
    from safetensors.torch import load_file

    base: dict[str, Any] = {}
    for f in sorted(Path(model).glob("*.safetensors")):
        base.update(load_file(str(f)))
    out = [base]
    for k in range(1, n):
        g = torch.Generator().manual_seed(seed * 100 + k)
        out.append(
            {
                name: t
                + 0.2 * (t.std() if t.numel() > 1 else 1.0) * torch.randn(t.shape, generator=g)
                if t.is_floating_point()
                else t
                for name, t in base.items()
            }
        )
    return out


def make_pool(n: int, seed: int, vocab: int) -> list[list[tuple[list[int], list[int]]]]:
    """n requests: [LONG] one 8K-token sequence, [MEDIUM] one of 1K tokens, then a quarter
    with 2-8 sequences and the rest one short sequence."""
    rng = np.random.default_rng(seed)

    def seq(prompt: tuple[int, int], response: tuple[int, int]) -> tuple[list[int], list[int]]:
        p = rng.integers(0, vocab, int(rng.integers(*prompt))).tolist()
        return p, rng.integers(0, vocab, int(rng.integers(*response))).tolist()

    out = [[seq((100, 200), (LONG_TOKENS - 400, LONG_TOKENS - 200))], [seq((20, 30), (990, 1000))]]
    while len(out) < n:
        k = int(rng.integers(2, 9)) if len(out) % 4 == 0 else 1
        out.append([seq((4, 24), (8, 64)) for _ in range(k)])
    return out


def references(model: str, sets: list[dict[str, Any]], pool: list) -> list[list[list[Any]]]:
    """refs[weight set][request][sequence]: each request scored alone, in this process,
    from the weights themselves."""
    from anchorcredit.runner import Scorer

    scorer = Scorer.from_pretrained(model, device="cpu", dtype="float32", entropy=False)
    refs = []
    for k, state in enumerate(sets):
        scorer.load_weights(state, f"reference-{k}")
        refs.append([scorer.score([(np.array(p), np.array(r)) for p, r in req]) for req in pool])
    return refs


def same(got: Any, want: Any) -> bool:
    return all(
        np.allclose(getattr(got, n), getattr(want, n), rtol=1e-4, atol=1e-5)
        for n in ("waad", "fai", "gamma")
    )


def distinct(refs: list[list[list[Any]]]) -> bool:
    """The weight sets give different numbers (else a version mix-up would be invisible)."""
    return all(
        not same(refs[i][j][0], refs[k][j][0])
        for i in range(len(refs))
        for k in range(i + 1, len(refs))
        for j in range(len(refs[0]))
        if len(refs[0][j][0].waad) > 16
    )


# ------------------------------------------------------------------------ the tally


@dataclasses.dataclass
class Tally:
    """Counts of the run. `take` hands out exactly `limit` calls, and none past `gate`
    (raised by the events as they start) so every event happens under load."""

    limit: int
    gate: int
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    started: int = 0
    ok: int = 0
    wrong: int = 0
    lost: Counter = dataclasses.field(default_factory=Counter)  # status code -> calls
    versions: Counter = dataclasses.field(default_factory=Counter)  # answers per version
    latencies: list[float] = dataclasses.field(default_factory=list)
    probes: dict[str, Counter] = dataclasses.field(default_factory=dict)  # kind -> codes
    unexpected: Counter = dataclasses.field(default_factory=Counter)  # kind -> count
    health_max_s: float = 0.0
    health_misses: int = 0
    health_checks: int = 0
    events: list[str] = dataclasses.field(default_factory=list)
    exits: list[str] = dataclasses.field(default_factory=list)
    late_exits: int = 0

    def take(self, stop: threading.Event, n: int = 1) -> int:
        """Reserve up to n calls (waiting at the gate); 0 once all were handed out."""
        while not stop.is_set():
            with self.lock:
                if self.started >= self.limit:
                    return 0
                room = min(self.gate, self.limit) - self.started
                if room > 0:
                    got = min(n, room)
                    self.started += got
                    return got
            time.sleep(0.02)
        return 0

    def reserve(self, n: int) -> int:
        """Up to n calls at once, past the gate (the burst), within the limit."""
        with self.lock:
            got = max(0, min(n, self.limit - self.started))
            self.started += got
            return got

    def open_to(self, fraction: float) -> None:
        with self.lock:
            self.gate = max(self.gate, int(round(fraction * self.limit)))

    @property
    def done(self) -> int:
        with self.lock:
            return self.ok + self.wrong + sum(self.lost.values())

    def probe(self, kind: str, code: str, expected: set[str]) -> None:
        with self.lock:
            self.probes.setdefault(kind, Counter())[code] += 1
            if code not in expected:
                self.unexpected[kind] += 1

    def note(self, msg: str) -> None:
        with self.lock:
            self.events.append(f"{self.ok + self.wrong + sum(self.lost.values()):>6}  {msg}")


def one_call(client: Any, pool: list, refs: list, tally: Tally, i: int) -> None:
    from anchorcredit.client import CreditServiceError

    t0 = time.perf_counter()
    prompts, responses = [p for p, _ in pool[i]], [r for _, r in pool[i]]
    try:
        got = client.score(prompts, responses)
    except CreditServiceError as exc:
        with tally.lock:
            tally.lost[exc.code.name] += 1
        tally.note(f"LOST {exc.code.name}: {' '.join(str(exc).split())[:300]}")
        return
    except Exception as exc:  # anything else is a lost call too, named by its type
        with tally.lock:
            tally.lost[type(exc).__name__] += 1
        tally.note(f"LOST {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        return
    seconds = time.perf_counter() - t0
    versions = {r.policy_version for r in got}
    k = VERSIONS.get(next(iter(versions))) if len(versions) == 1 else None
    right = k is not None and all(same(g, w) for g, w in zip(got, refs[k][i], strict=True))
    with tally.lock:
        tally.latencies.append(seconds)
        tally.versions["/".join(sorted(versions))] += 1
        if right:
            tally.ok += 1
        else:
            tally.wrong += 1


def caller(idx: int, setup: Setup, targets: list, cache: Any, pool: list, refs: list,
           tally: Tally, stop: threading.Event) -> None:  # fmt: skip
    rng = np.random.default_rng(setup.args.seed + idx)
    with setup.client(targets, cache=cache) as client:
        while tally.take(stop):
            one_call(client, pool, refs, tally, int(rng.integers(MEDIUM + 1, len(pool))))


# ------------------------------------------------------------------------ probes


def _code(fn: Any, *args: Any, **kw: Any) -> str:
    import grpc

    try:
        out = fn(*args, **kw)
        if hasattr(out, "__next__"):
            for _ in out:
                pass
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


def probe_cases(
    setup: Setup, target: str, good: bytes, long: bytes
) -> list[tuple[str, Any, set[str]]]:
    """(kind, call, codes it may end with): garbage on every method (with the token it
    needs, so it is parsed), security refusals, deadlines shorter than the work."""
    import grpc

    admin = (("authorization", f"Bearer {ADMIN}"),)
    scoring = (("authorization", f"Bearer {TOKEN}"),)
    wrong = (("authorization", "Bearer not-the-token"),)
    ch = setup.channel(target)
    plain = grpc.insecure_channel(target)

    def unary(name: str, c: Any = ch) -> Any:
        return c.unary_unary(f"/{SERVICE}/{name}", request_serializer=None)

    push = ch.stream_unary(f"/{SERVICE}/PushWeights", request_serializer=None)
    stream = ch.stream_stream(f"/{SERVICE}/ScoreStream", request_serializer=None)
    bad = b"\xff\xff\xff\xff not a protobuf"
    score = unary("Score")
    cases: list[tuple[str, Any, set[str]]] = []
    for name in ("Score", "GetModelInfo", "UpdateWeights", "JoinWeightGroup",
                 "ReceiveWeights", "LeaveWeightGroup"):  # fmt: skip
        meta = scoring if name in ("Score", "GetModelInfo") else admin
        call = unary(name)
        cases.append(("garbage", lambda c=call, m=meta: c(bad, timeout=30, metadata=m), set()))
    plain_score = unary("Score", plain)
    denied, forbidden = {"UNAUTHENTICATED"}, {"PERMISSION_DENIED"}
    late = {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}  # dropped, or refused by a full queue
    cases += [
        ("garbage", lambda: push(iter([bad]), timeout=30, metadata=admin), set()),
        # the stream answers its first (good) frame before the bad one: a scoring wait
        ("garbage", lambda: stream(iter([good, bad, good]), timeout=300, metadata=scoring), set()),
        ("security", lambda: score(good, timeout=30), denied),
        ("security", lambda: score(good, timeout=30, metadata=wrong), denied),
        ("security", lambda: push(iter([bad]), timeout=30, metadata=scoring), forbidden),
        ("security", lambda: plain_score(good, timeout=5, metadata=scoring), {"UNAVAILABLE"}),
        ("security", lambda: outside_path(setup, target), forbidden),
        ("deadline", lambda: score(long, timeout=0.05, metadata=scoring), late),
    ]
    # garbage: INVALID_ARGUMENT, whatever the method
    return [(k, c, e or {"INVALID_ARGUMENT"}) for k, c, e in cases]


def outside_path(setup: Setup, target: str) -> None:
    from anchorcredit.v1 import credit_pb2 as pb
    from anchorcredit.v1 import credit_pb2_grpc

    with setup.channel(target) as ch:
        req = pb.UpdateWeightsRequest(path=setup.model, version="never")  # outside the dir
        credit_pb2_grpc.CreditServiceStub(ch).UpdateWeights(
            req, timeout=30, metadata=(("authorization", f"Bearer {ADMIN}"),)
        )


def prober(setup: Setup, server: Server, good: tuple[bytes, bytes], tally: Tally,
           down: set[str], stop: threading.Event) -> None:  # fmt: skip
    """One probe every --garbage-every-s, round-robin over probe_cases, while `server` is
    up (one it went down during is not counted)."""
    cases = probe_cases(setup, server.target, *good)
    n = 0
    while not stop.wait(setup.args.garbage_every_s):
        if server.name in down:
            continue
        kind, call, expected = cases[n % len(cases)]
        n += 1
        code = _code(call)
        if server.name not in down:
            tally.probe(kind, code, expected)


def health(setup: Setup, servers: list[Server], down: set[str], tally: Tally,
           stop: threading.Event) -> None:  # fmt: skip
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channels = {s.name: setup.channel(s.target) for s in servers}
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


# ------------------------------------------------------------------------ events


class Events:
    """The scheduled failures (module doc), each once `tally.done` reaches its fraction."""

    def __init__(self, setup: Setup, servers: list[Server], redis: Redis, sets: list,
                 pool: list, refs: list, tally: Tally, down: set[str],
                 stop: threading.Event) -> None:  # fmt: skip
        self.setup, self.servers, self.redis, self.sets = setup, servers, redis, sets
        self.pool, self.refs, self.tally, self.down, self.stop = pool, refs, tally, down, stop
        self.restarted: dict[str, threading.Event] = {}

    def run(self) -> None:
        steps = [self.kill_a, self.hung_joins, self.redis_restart, self.push_w1,
                 self.sigterm_b, self.burst, self.push_w2]  # fmt: skip
        longs: list[threading.Thread] = []
        try:
            for i, (fraction, step) in enumerate(zip(FRACTIONS, steps, strict=True)):
                if not self.at(fraction):
                    return
                nxt = FRACTIONS[i + 1] if i + 1 < len(FRACTIONS) else 1.0
                self.tally.open_to(nxt)  # calls go on while the event runs
                longs.append(threading.Thread(target=self.long_call, daemon=True))
                longs[-1].start()
                step()
        except Exception as exc:  # an event that breaks is reported, the run goes on
            self.tally.note(f"event FAILED: {type(exc).__name__}: {exc}")
            with self.tally.lock:
                self.tally.unexpected["events"] += 1
        finally:
            self.tally.open_to(1.0)
            for t in longs:
                t.join()

    def long_call(self) -> None:
        """One 8K-token request (a forward of many seconds on a CPU) beside the event."""
        if self.tally.reserve(1):
            with self.setup.client([s.target for s in self.servers], timeout_s=900) as c:
                one_call(c, self.pool, self.refs, self.tally, LONG)

    def at(self, fraction: float) -> bool:
        while not self.stop.is_set():
            if self.tally.done >= int(round(fraction * self.tally.limit)):
                return True
            time.sleep(0.05)
        return False

    def restart(self, s: Server) -> None:
        """Start `s` again in the background (the other events go on meanwhile)."""
        back = self.restarted[s.name] = threading.Event()

        def go() -> None:
            s.start()
            s.wait_ready()
            self.down.discard(s.name)
            self.tally.note(f"server {s.name} serving again")
            back.set()

        threading.Thread(target=go, daemon=True).start()

    def wait_all_up(self) -> None:
        for ev in self.restarted.values():
            while not ev.wait(0.1):
                if self.stop.is_set():
                    raise RuntimeError("stopped while a server was restarting")

    def kill_a(self) -> None:
        a = self.servers[0]
        self.down.add(a.name)
        a.sigkill()
        self.tally.note("SIGKILL server A")
        self.restart(a)

    def hung_joins(self) -> None:
        import grpc

        from anchorcredit.v1 import credit_pb2 as pb
        from anchorcredit.v1 import credit_pb2_grpc

        b = self.servers[1]
        meta = (("authorization", f"Bearer {ADMIN}"),)
        with socket.socket() as silent, self.setup.channel(b.target) as ch:
            silent.bind(("127.0.0.1", 0))
            silent.listen(16)  # accepts, never answers
            stub = credit_pb2_grpc.CreditServiceStub(ch)
            reqs = [
                pb.JoinWeightGroupRequest(
                    group=f"chaos-hung-{i}", address="127.0.0.1", port=silent.getsockname()[1],
                    world_size=2, rank=1, backend="gloo", timeout_s=2.0,
                )
                for i in range(5)
            ]  # fmt: skip
            futures = [stub.JoinWeightGroup.future(r, timeout=60, metadata=meta) for r in reqs]
            for f in futures:
                try:
                    f.result()
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                self.tally.probe("hung join", code, {"DEADLINE_EXCEEDED"})
        self.tally.note("5 JoinWeightGroup calls to a silent port on B answered")

    def redis_restart(self) -> None:
        self.redis.kill()
        self.tally.note("redis-server killed")
        time.sleep(1.0)
        self.redis.start()
        self.tally.note("redis-server started again")

    def push(self, k: int, version: str) -> None:
        self.wait_all_up()
        targets = [s.target for s in self.servers]
        with self.setup.client(targets, admin_token=ADMIN) as admin:
            admin.push_weights(self.sets[k], version, timeout_s=300)
        self.tally.note(f"weights W{k} pushed to A and B as {version!r}")

    def push_w1(self) -> None:
        """W1 as "chaos-1"; then W2 under "0", the label both servers started with (W0):
        refused by each (it was accepted before, and "0" then named two weight sets)."""
        from anchorcredit.client import CreditServiceError

        self.push(1, "chaos-1")
        targets = [s.target for s in self.servers]
        with self.setup.client(targets, admin_token=ADMIN) as admin:
            try:
                admin.push_weights(self.sets[2], "0", timeout_s=300)
                codes = ["OK"] * len(targets)
            except CreditServiceError as exc:
                failed = getattr(exc, "failed", {})
                codes = [failed[t].code.name if t in failed else "OK" for t in targets]
        for code in codes:
            self.tally.probe("label reuse", code, {"FAILED_PRECONDITION"})
        self.tally.note(f"W2 pushed under the label '0' of W0: {', '.join(codes)}")

    def sigterm_b(self) -> None:
        b = self.servers[1]
        self.down.add(b.name)
        self.exit_time(b)
        self.restart(b)

    def exit_time(self, s: Server) -> None:
        bound = self.setup.args.grace_s + 5.0
        seconds = s.sigterm(bound + 30.0)
        ok = seconds is not None and seconds <= bound
        text = "did not exit" if seconds is None else f"{seconds:.1f} s"
        with self.tally.lock:
            self.tally.exits.append(f"{s.name}: {text}")
            self.tally.late_exits += not ok
        self.tally.note(f"SIGTERM server {s.name}: exited in {text} (bound {bound:g} s)")

    def burst(self) -> None:
        size = self.setup.args.burst_x * self.setup.args.max_queue
        size = self.tally.reserve(min(size, max(1, self.tally.limit // 10)))  # in --requests
        go = threading.Barrier(size + 1)
        with self.setup.client([s.target for s in self.servers]) as client:

            def one(i: int) -> None:
                go.wait()
                one_call(client, self.pool, self.refs, self.tally, 2 + i % (len(self.pool) - 2))

            threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(size)]
            for t in threads:
                t.start()
            go.wait()
            self.tally.note(f"burst of {size} calls released")
            for t in threads:
                t.join()
        self.tally.note("burst done")

    def push_w2(self) -> None:
        self.push(2, "chaos-2")


# ------------------------------------------------------------------------ report


def table(tally: Tally, servers: list[Server], rss: dict, crashes: int, wall: float,
          args: argparse.Namespace) -> str:  # fmt: skip
    lat = np.array(tally.latencies) if tally.latencies else np.array([float("nan")])
    made = tally.ok + tally.wrong + sum(tally.lost.values())
    hung = tally.started - made
    fails = ", ".join(f"{k} {v}" for k, v in sorted(tally.lost.items())) or "none"
    rows = [
        ("requests", f"{tally.started} of --requests {args.requests} from {args.callers} "
         f"callers (the burst and one 8K call per event included), in {wall:.0f} s"),
        ("lost / wrong / hung", f"{sum(tally.lost.values())} / {tally.wrong} / "
         f"{hung + tally.late_exits}"),
        ("answers per policy version", ", ".join(f"{k} {v}" for k, v in
                                                 sorted(tally.versions.items()))),
        ("failures by status code (after client retries)", fails),
    ]  # fmt: skip
    for kind, codes in sorted(tally.probes.items()):
        text = ", ".join(f"{k} {v}" for k, v in sorted(codes.items()))
        rows.append((f"probe: {kind}", f"{text} ({tally.unexpected[kind]} unexpected)"))
    rows += [
        (f"SIGTERM exit (bound --grace-s {args.grace_s:g} + 5 s)", "; ".join(tally.exits)),
        ("crashes (server exits we did not cause)", f"{crashes}"),
        ("health (every 100 ms, live servers)", f"{tally.health_checks} checks, slowest "
         f"{tally.health_max_s * 1000:.0f} ms, {tally.health_misses} over 1 s or failed"),
        ("latency p50 / p99", f"{np.percentile(lat, 50) * 1000:.0f} ms / "
         f"{np.percentile(lat, 99) * 1000:.0f} ms"),
    ]  # fmt: skip
    for s in servers:
        before, after = rss.get(s.name, (float("nan"), float("nan")))
        life = "since its restart" if s.lives > 1 else "whole run"
        rows.append(
            (f"server {s.name} RSS ready / end ({life})", f"{before:.0f} / {after:.0f} MiB")
        )
    out = ["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(out)


def clean(tally: Tally, crashes: int) -> bool:
    made = tally.ok + tally.wrong + sum(tally.lost.values())
    return (
        tally.wrong == 0
        and not tally.lost
        and tally.started == made == tally.limit
        and tally.late_exits == 0
        and crashes == 0
        and not sum(tally.unexpected.values())
        and tally.health_misses == 0
    )


# ------------------------------------------------------------------------ main


def prepare(work: Path, args: argparse.Namespace) -> tuple[Setup, list, list, list]:
    """The model, certificates, weight sets, pool and references."""
    from tiny_model import save_debug_model  # tests/support/debug_model.py

    model = str(save_debug_model(work / "model", arch="llama", max_position_embeddings=LONG_TOKENS))
    ca, cert, key = make_pki(work)
    weights_dir = work / "weights"
    weights_dir.mkdir()
    setup = Setup(work, model, ca, cert, key, weights_dir, args)
    sets = weight_sets(model, len(VERSIONS), args.seed)
    pool = make_pool(args.pool, args.seed, vocab=256)
    t0 = time.monotonic()
    refs = references(model, sets, pool)
    if not distinct(refs):
        raise SystemExit("the weight sets give the same numbers: a mix-up would be invisible")
    print(f"references of {len(sets)} weight sets x {len(pool)} requests: "
          f"{time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
    return setup, sets, pool, refs


def run(setup: Setup, sets: list, pool: list, refs: list) -> int:
    from anchorcredit.v1 import credit_pb2 as pb

    args = setup.args
    redis = Redis(setup.work)
    servers = [Server(n, setup) for n in ("A", "B")]
    tally = Tally(limit=args.requests, gate=int(round(FRACTIONS[0] * args.requests)))
    stop, down = threading.Event(), set()
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        targets = [s.target for s in servers]
        good = tuple(
            pb.ScoreRequest(
                sequences=[pb.Sequence(prompt_ids=pool[i][0][0], response_ids=pool[i][0][1])]
            ).SerializeToString()
            for i in (-1, MEDIUM)  # a short request, a 1K-token one (deadline probes)
        )
        callers = [
            threading.Thread(target=caller, daemon=True, args=(
                i, setup, targets, redis.url if i % 2 == 0 else False, pool, refs, tally, stop))
            for i in range(args.callers)
        ]  # fmt: skip
        events = Events(setup, servers, redis, sets, pool, refs, tally, down, stop)
        side = [
            threading.Thread(target=prober, args=(setup, servers[1], good, tally, down, stop)),
            threading.Thread(target=health, args=(setup, servers, down, tally, stop)),
        ]
        ev = threading.Thread(target=events.run, daemon=True)
        t0 = time.monotonic()
        for t in [*callers, *side, ev]:
            t.daemon = True
            t.start()
        deadline = t0 + args.deadline_s
        for t in [ev, *callers]:
            t.join(max(0.0, deadline - time.monotonic()))
        stop.set()
        for t in side:
            t.join(30)
        wall = time.monotonic() - t0
        return report(events, servers, tally, wall, args)
    finally:
        stop.set()
        for s in servers:
            s.stop()
        redis.kill()


def report(events: Events, servers: list[Server], tally: Tally, wall: float,
           args: argparse.Namespace) -> int:  # fmt: skip
    crashes = sum(
        1
        for s in servers
        if s.proc is not None and s.proc.poll() is not None and not s.killed_by_us
    )
    rss = {}
    for s in servers:
        now = rss_mib(s.proc.pid) if s.proc and s.proc.poll() is None else float("nan")
        rss[s.name] = (s.rss_start, now)
    for s in servers:  # the end: SIGTERM each, timed
        if s.proc is not None and s.proc.poll() is None:
            events.exit_time(s)
    print("events (calls done, event):")
    for e in tally.events:
        print("  " + e)
    print()
    print(table(tally, servers, rss, crashes, wall, args))
    return 0 if clean(tally, crashes) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="anchorcredit-chaos-") as tmp:
        setup, sets, pool, refs = prepare(Path(tmp), args)
        return run(setup, sets, pool, refs)


if __name__ == "__main__":
    sys.exit(main())
