"""The shared test helpers of conftest.py check themselves."""

from __future__ import annotations

import socket


def test_redis_helper_starts_and_stops(redis_process):
    import redis

    r = redis_process()
    try:
        assert redis.Redis.from_url(r.url).ping()
    finally:
        r.kill()
    assert r.proc.poll() is not None


def test_free_port_is_loopback_bindable(free_port):
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_ci_fails_a_module_skipped_at_collection(tmp_path):
    """A test file skipped by a module-level importorskip (a trainer's missing dependency)
    fails a CI run; outside CI it stays a skip with its reason."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_needs_missing.py").write_text(
        "import pytest\n"
        "pytest.importorskip('anchorcredit_no_such_module')\n\n"
        "def test_never_runs():\n    pass\n"
    )
    (tmp_path / "test_runs.py").write_text("def test_runs():\n    pass\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    local = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    ci_env = {**env, "CI": "true"}
    ci = subprocess.run(cmd, cwd=tmp_path, env=ci_env, capture_output=True, text=True)
    assert local.returncode == 0, local.stdout
    assert ci.returncode != 0, ci.stdout
    assert "CI forbids skipped tests" in ci.stdout and "anchorcredit_no_such_module" in ci.stdout
