"""Helpers the client tests share: a private redis-server and an in-thread CreditServer.

Everything binds 127.0.0.1 only and is stopped by whoever started it. The two tests at the
bottom check the helpers themselves.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """`redis-server --port <free> --save '' --appendonly no` on loopback; kill() stops it."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (CI installs it with apt-get)")
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
    """A real anchorcredit CreditServer (grpc.aio) on 127.0.0.1:<free>, in its own loop/thread."""

    def __init__(self, model: str | Path | None = None, scorer: Any = None, **config: Any):
        from anchorcredit.server.app import CreditServer
        from anchorcredit.server.config import ServeConfig

        cfg = ServeConfig(
            model=str(model) if model else None,
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            device="cpu",
            dtype="float32",
            **config,
        )
        self.server = CreditServer(cfg, scorer=scorer)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(120):
            raise TimeoutError("server did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
            self.loop.run_until_complete(self.server.load())
        except BaseException as e:  # report to the constructor
            self._error = e
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        if self._thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop)
            fut.result(60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)


def test_redis_helper_starts_and_stops():
    import redis

    r = RedisProcess()
    try:
        assert redis.Redis.from_url(r.url).ping()
    finally:
        r.kill()
    assert r.proc.poll() is not None


def test_free_port_is_loopback_bindable():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
