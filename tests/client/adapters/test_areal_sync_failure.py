"""AReaL weight sync across 2 gloo ranks: a push that fails on rank 0 fails every rank (no
rank waits forever at the sync point), and a good push sets the version on every rank.

The service is a stand-in client object (only its push_weights is called); the ranks are
real torch.distributed processes on the CPU.
"""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")
import torch.multiprocessing as mp  # noqa: E402


class _Client:
    def __init__(self, fail: bool):
        self.fail = fail

    def push_weights(self, weights, version, **kw):
        list(weights)
        if self.fail:
            raise ConnectionError("credit service unreachable")


def _rank(rank: int, init: str, fail: bool, results) -> None:
    import torch.distributed as dist

    from anchorcredit.client.adapters.areal_sync import AReaLWeightSync

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        engine = types.SimpleNamespace(model=torch.nn.Linear(4, 4))
        sync = AReaLWeightSync(_Client(fail), run_id="r")
        try:
            results[rank] = ("ok", sync.push(engine, 3))
        except Exception as e:
            results[rank] = ("error", f"{type(e).__name__}: {e}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("fail", [False, True])
def test_rank0_outcome_reaches_every_rank(tmp_path, fail):
    # fork: the ranks run this module's function without re-importing the test module
    ctx = mp.get_context("fork")
    with ctx.Manager() as manager:
        results = manager.dict()
        init = f"file://{tmp_path / 'pg'}"
        ranks = [ctx.Process(target=_rank, args=(r, init, fail, results)) for r in (0, 1)]
        for p in ranks:
            p.start()
        for p in ranks:
            p.join(timeout=120)
        hung = [p.pid for p in ranks if p.is_alive()]
        for p in ranks:
            if p.is_alive():
                p.kill()
        assert not hung, f"ranks {hung} still waiting after 120 s"
        got = dict(results)
    if fail:
        assert got[0] == ("error", "ConnectionError: credit service unreachable")
        assert got[1][0] == "error" and "rank 0 could not push policy 'step-3-r'" in got[1][1]
    else:
        assert got == {0: ("ok", "step-3-r"), 1: ("ok", "step-3-r")}
