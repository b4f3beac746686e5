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
