"""A CreditServer in a thread of the benchmark's own process, on loopback (shared by the
bench scripts; tests use the `start_server` fixture of tests/conftest.py instead)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path


def start_server_thread(
    model_dir: Path, device: str = "cpu", dtype: str = "float32", timeout_s: float = 300.0
) -> tuple[str, Callable[[], None]]:
    """(target, stop) of a server serving `model_dir` once it is loaded."""
    from anchorcredit.server.app import CreditServer
    from anchorcredit.server.config import ServeConfig

    cfg = ServeConfig(
        model=str(model_dir), host="127.0.0.1", port=0, metrics_port=-1, device=device,
        dtype=dtype, allow_unauthenticated_weights=True,  # a loopback benchmark pushes weights
    )  # fmt: skip
    server = CreditServer(cfg)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        loop.run_until_complete(server.load())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(timeout_s):
        raise RuntimeError("the server did not start")

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)

    return f"127.0.0.1:{server.port}", stop
