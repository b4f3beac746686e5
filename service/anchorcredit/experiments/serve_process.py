"""A real `anchorcredit serve` subprocess for the experiment (loopback only, stopped after).

Weight pushes need the admin role: a random admin token is made per experiment and handed
to the server through the environment (never argv), and to the client.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

READY = re.compile(r"gRPC on 127\.0\.0\.1:(\d+)")
LOADED = re.compile(r"loaded in")


class ServeProcess:
    """`anchorcredit serve --model MODEL --entropy` on 127.0.0.1, a free port, CPU or GPU."""

    def __init__(
        self, model: str | Path, log_path: Path, device: str = "auto", threads: int | None = None
    ) -> None:
        self.admin_token = secrets.token_hex(16)
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "ANCHORCREDIT_HOST": "127.0.0.1",
            "ANCHORCREDIT_PORT": "0",
            "ANCHORCREDIT_METRICS_PORT": "-1",
            "ANCHORCREDIT_ADMIN_TOKEN": self.admin_token,
        }
        if threads:  # torch's intra-op threads in the server, as in the trainer
            env["OMP_NUM_THREADS"] = str(threads)
        cli = "import sys; from anchorcredit.cli import main; sys.exit(main())"
        cmd = [sys.executable, "-c", cli, "serve", "--model", str(model), "--entropy"]
        cmd += ["--device", device]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("a")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.port = 0

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._log.write(line)
            self._log.flush()

    def wait_ready(self, timeout_s: float = 600.0) -> str:
        """The target once the model is loaded; RuntimeError with the output otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = "".join(self.lines)
            m = READY.search(text)
            if m and LOADED.search(text):
                self.port = int(m.group(1))
                return f"127.0.0.1:{self.port}"
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            "anchorcredit serve did not become ready:\n" + "".join(self.lines)[-3000:]
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
