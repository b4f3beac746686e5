"""Server metrics (server/metrics.py) without a server."""

from __future__ import annotations

from anchorcredit.server.metrics import one_two_five


def test_buckets_are_one_two_five():
    assert one_two_five(-1, 0) == (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
