"""Tiles per device (engine/span/defaults.py): the first candidate that fits the GPU's shared
memory, the limit queried from the device or read from the table by compute capability.
The estimate is checked against compiled cubins in tests/bench/test_span_aot.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from anchorcredit.engine.span import defaults
from anchorcredit.engine.span.defaults import Blocks, default_blocks, device_for, shared_bytes

BF16 = torch.bfloat16


def test_the_table_of_known_gpus():
    assert device_for((8, 0)).shared_bytes == 163 * 1024
    assert device_for((8, 6)).shared_bytes == device_for((8, 9)).shared_bytes == 99 * 1024
    assert device_for((9, 0)).shared_bytes == 227 * 1024
    assert device_for((12, 0)).shared_bytes == 99 * 1024
    assert device_for((7, 5)).shared_bytes == defaults.UNKNOWN_SHARED  # the smallest known
    assert device_for(None).capability is None  # the interpreter on the CPU


def test_estimates_match_the_compiled_kernels():
    """Triton's allocation as the AOT table measured it (triton 3.9, bf16, d=128)."""
    kib = 1024
    sm80, sm90 = device_for((8, 0)), device_for((9, 0))
    assert shared_bytes("row", Blocks(128, 64, 8, 3), 128, 2, sm80) == 65 * kib
    assert shared_bytes("row", Blocks(128, 64, 8, 3), 128, 2, sm90) == 81 * kib  # 80 measured
    assert shared_bytes("col", Blocks(128, 64, 8, 3), 128, 2, sm80) == 81 * kib  # 80 measured
    assert shared_bytes("lse", Blocks(64, 64, 8, 3), 128, 2, sm90) == 65 * kib  # 64 measured


@pytest.mark.parametrize("cap", [(8, 0), (8, 6), (8, 9), (9, 0), (12, 0)])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("kind", ["row", "col", "band", "lse", "waad"])
def test_every_default_fits_its_gpu(cap, d, kind):
    dev = device_for(cap)
    cfg = default_blocks(kind, BF16, d, dev)
    assert shared_bytes(kind, cfg, d, 2, dev) <= dev.shared_bytes
    assert cfg.block_m >= 16 and cfg.block_n >= 16


def test_the_99_kib_gpus_get_smaller_tiles_at_head_dim_256():
    """A10G / L4 / RTX 30-40 (sm_86 / sm_89): the 128x64, 3-stage row pass needs 129 KiB at
    d=256; there it drops a stage, as the column pass does."""
    big, small = device_for((8, 0)), device_for((8, 9))
    assert default_blocks("row", BF16, 256, big) == Blocks(128, 64, 8, 3)
    assert default_blocks("row", BF16, 256, small) == Blocks(128, 64, 8, 2)
    assert default_blocks("col", BF16, 256, small).num_stages == 2
    assert default_blocks("row", BF16, 128, small) == Blocks(128, 64, 8, 3)  # d=128 fits as is


def test_dtype_and_interpreter_defaults():
    dev = device_for((9, 0))
    assert default_blocks("row", torch.float32, 128, dev) == defaults.FP32
    assert default_blocks("lse", BF16, 128, dev, interpreting=True) == defaults.INTERPRETED
    assert default_blocks("lse", BF16, 128, dev) == Blocks(64, 64, 8, 3)


def test_the_device_is_queried(monkeypatch):
    """A CUDA device reports its own limit (torch's shared_memory_per_block_optin); an older
    torch without it falls back to the table."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (8, 9))
    props = SimpleNamespace(shared_memory_per_block_optin=48 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    defaults._queried.cache_clear()
    try:
        dev = device_for(None, torch.device("cuda", 0))
        assert dev.capability == (8, 9) and dev.shared_bytes == 48 * 1024
        # 48 KiB: the row pass at d=128 falls to its smallest candidate
        assert default_blocks("row", BF16, 128, dev) == Blocks(64, 64, 4, 2)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace())
        defaults._queried.cache_clear()
        assert device_for(None, torch.device("cuda", 0)).shared_bytes == 99 * 1024
    finally:
        defaults._queried.cache_clear()


def test_plans_pick_the_tiles_of_their_gpu():
    pytest.importorskip("triton")
    from anchorcredit.engine.span import triton_kernel

    q = torch.zeros(4, 300, 256, dtype=BF16)
    k = torch.zeros(2, 300, 256, dtype=BF16)
    rows = {}
    for cap in ((8, 0), (8, 9)):
        plan = triton_kernel.plan_packed(q, k, [0, 300], [10], check_finite=False, capability=cap)
        rows[cap] = plan.row.options["num_stages"]
    assert rows == {(8, 0): 3, (8, 9): 2}
