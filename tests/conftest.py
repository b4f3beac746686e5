"""Shared fixtures and helpers of the whole suite (tests/ mirrors the source tree).

- GPU-marked tests skip on machines without CUDA (CI has none); in CI nothing else may skip.
- `free_port`, `redis_process` and `start_server` give tests a loopback port, a private
  redis-server and a real CreditServer in its own thread, each stopped at teardown.
- `llama_model`, `qwen2_model`, `qwen3_model` (seed 0) and `other_llama_model` (seed 1: the
  same shapes, other values) are the tiny debug models (tests/support/debug_model.py), saved
  once per session. Read them, never write into them: a test that needs a modified copy
  saves its own with `debug_model.save_debug_model`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# No network in tests: libraries that would reach a hub or send telemetry stay offline.
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
for _var in (*OFFLINE_VARS, "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # the light client's tests run without torch
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on the GPU box)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# In CI nothing may skip silently: a skip is allowed only for GPU-marked tests (CI has no GPU).
# Locally a missing optional tool may skip; CI installs every tool, so a skip there is a bug.
_unexpected_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "gpu" not in report.keywords:
        _unexpected_skips.append(f"{report.nodeid}: {report.longrepr}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    # A module-level importorskip skips the whole file at collection, before any test report:
    # a missing dependency of a covered trainer must fail CI too, not vanish from the count.
    if report.skipped:
        _unexpected_skips.append(f"{report.nodeid}: {report.longrepr}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and os.environ.get("CI"):
        lines = "\n  ".join(_unexpected_skips)
        print(f"\nCI forbids skipped tests that are not GPU-only:\n  {lines}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """`redis-server --port <free> --save '' --appendonly no` on loopback; kill() stops it."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            # A skip with the install command locally; in CI every non-GPU skip fails the run.
            pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.kill()
        pytest.fail("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class ServerThread:
    """A real CreditServer (grpc.aio) on 127.0.0.1:<free>, on its own event-loop thread.

    ServerThread(model_dir_or_None, backend=None, load=True, backend_factory=None, **config):
    config fields default to loopback, port 0, no /metrics, CPU float32, and development-mode
    weight changes (allow_unauthenticated_weights=True). `stub` and `health`
    are sync clients of it; `sample(name, labels)` reads its Prometheus registry.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        backend: Any = None,
        *,
        load: bool = True,
        backend_factory: Any = None,
        **config: Any,
    ):
        import grpc
        from grpc_health.v1 import health_pb2_grpc

        from anchorcredit.server.app import CreditServer
        from anchorcredit.server.config import ServeConfig
        from anchorcredit.v1 import credit_pb2_grpc

        # Development mode for weight changes (no admin token, any path), so the suite's
        # servers take UpdateWeights/PushWeights as before; tests/server/test_security.py
        # passes allow_unauthenticated_weights=False to test the default.
        base = dict(
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            device="cpu",
            dtype="float32",
            allow_unauthenticated_weights=True,
        )
        cfg = ServeConfig(model=str(model) if model else None, **{**base, **config})
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = CreditServer(cfg, backend=backend, backend_factory=backend_factory)
        try:
            self.run(self.server.start())
            if load:
                self.run(self.server.load(), timeout=120)
        except BaseException:
            self.stop()
            raise
        self.channel = grpc.insecure_channel(self.target)
        self.stub = credit_pb2_grpc.CreditServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.server.metrics.registry.get_sample_value(name, labels or {}) or 0.0

    def registry_value(self, name: str) -> float | None:
        """A sample without labels, None when absent (unlike sample(), which reads 0)."""
        return self.server.metrics.registry.get_sample_value(name)

    def stop(self, grace: float = 0.0) -> None:
        """Stop the server and its loop (idempotent)."""
        if not self._thread.is_alive():
            return
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.close()
        try:
            self.run(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)


# AReaL's logging.getLogger (areal/utils/logging.py) swaps in a new root logger and Manager on
# every call, so once AReaL is imported (test collection does it), loggers made afterwards no
# longer reach the root that pytest's caplog listens on. Put the original back before each
# test and re-parent the loggers made in the meantime.
_ROOT, _MANAGER = logging.root, logging.Logger.manager


def _restore_logging() -> None:
    foreign = logging.Logger.manager
    if foreign is _MANAGER and logging.Logger.root is _ROOT:
        return
    logging.Logger.root, logging.Logger.manager = _ROOT, _MANAGER
    for name, lg in list(foreign.loggerDict.items()):
        if isinstance(lg, logging.Logger) and name.startswith("anchorcredit"):
            lg.manager = _MANAGER
            _MANAGER.loggerDict.setdefault(name, lg)
            _MANAGER._fixupParents(lg)  # parent = nearest ancestor under the original root


@pytest.fixture(autouse=True)
def _logging_reaches_the_root() -> Iterator[None]:
    _restore_logging()
    yield
    _restore_logging()


def _saved_debug_model(factory: pytest.TempPathFactory, arch: str, seed: int = 0) -> Path:
    from debug_model import save_debug_model

    return save_debug_model(factory.mktemp(f"{arch}-{seed}") / arch, arch=arch, seed=seed)


@pytest.fixture(scope="session")
def llama_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama debug model (seed 0), saved once per session; read-only."""
    return _saved_debug_model(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def other_llama_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama debug model with other weights (seed 1): a second policy version."""
    return _saved_debug_model(tmp_path_factory, "llama", seed=1)


@pytest.fixture(scope="session")
def qwen2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2 debug model (seed 0), saved once per session; read-only."""
    return _saved_debug_model(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def qwen3_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3 debug model (seed 0), saved once per session; read-only."""
    return _saved_debug_model(tmp_path_factory, "qwen3")


@pytest.fixture(name="free_port", scope="session")
def free_port_fixture() -> Callable[[], int]:
    """A function returning a loopback port nothing listens on (yet)."""
    return free_port


@pytest.fixture(scope="session")
def redis_process() -> Iterator[Callable[[], RedisProcess]]:
    """Start a private redis-server on loopback; every one started is killed at the end."""
    started: list[RedisProcess] = []

    def start() -> RedisProcess:
        started.append(RedisProcess())
        return started[-1]

    yield start
    for r in started:
        r.kill()


@pytest.fixture(scope="session")
def start_server() -> Iterator[Callable[..., ServerThread]]:
    """Start a real CreditServer: start_server(model_dir_or_None, backend=None, **config)."""
    started: list[ServerThread] = []

    def start(model: str | Path | None = None, backend: Any = None, **kw: Any) -> ServerThread:
        started.append(ServerThread(model, backend, **kw))
        return started[-1]

    yield start
    for s in started:
        s.stop()


class ServeProcess:
    """`anchorcredit serve ARGS` as a real process; its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        cli = "import sys; from anchorcredit.cli import main; sys.exit(main())"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", cli, "serve", *args],
            cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float = 120.0) -> re.Match:
        """The first output line matching `pattern`; fails with the output on timeout or exit."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in server output:\n{self.output()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 60 s, if it still runs."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def serve_process() -> Iterator[Callable[..., ServeProcess]]:
    """serve_process(*args, **env): `anchorcredit serve` as a real process, stopped after."""
    started: list[ServeProcess] = []

    def start(*args: str, **env: str) -> ServeProcess:
        started.append(ServeProcess(list(args), env))
        return started[-1]

    yield start
    for p in started:
        p.stop()
