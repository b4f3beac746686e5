"""The Triton span kernel against the materialised oracle (SPEC.md).

CPU tests run the kernel under Triton's interpreter: the `interpret` fixture sets
TRITON_INTERPRET=1 for the test only. The kernel module jits its functions on first use
per interpreter mode, so this works whatever imported triton earlier in the session.
The interpreter is slow: sizes and block sizes here are small on purpose (N <= 512).
GPU tests (marked gpu) check bf16 at 1K..32K tokens against float64 and skip without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from anchorcredit.engine import span_stats
from anchorcredit.engine.span.chunked import span_stats_chunked
from anchorcredit.engine.span.reference import relative_error, span_stats_reference

triton = pytest.importorskip("triton")
from anchorcredit.engine.span.triton_kernel import span_stats_packed  # noqa: E402

FIELDS = ("span", "waad", "fai")


def assert_same(a, b) -> None:
    """Two kernel variants agree: to float32 rounding, field by field."""
    for field in FIELDS:
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-6, atol=1e-6)


def random_qk(hq: int, hkv: int, n: int, d: int, seed: int, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    # A spread of score magnitudes so some heads are sharp (local) and some flat (global).
    sharp = torch.linspace(0.3, 3.0, hq, dtype=torch.float64)[:, None, None]
    q = torch.randn(hq, n, d, generator=gen, dtype=torch.float64) * sharp
    k = torch.randn(hkv, n, d, generator=gen, dtype=torch.float64)
    return q.to(device), k.to(device)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs error over max |expected|: each statistic relative to its own scale."""
    return relative_error(actual, expected)


def assert_matches(got, ref, tol: float) -> None:
    for field in FIELDS:
        a, e = getattr(got, field), getattr(ref, field)
        assert a.shape == e.shape, field
        assert a.dtype == torch.float32, field
        assert rel_err(a, e) <= tol, f"{field}: rel err {rel_err(a, e):.2e} > {tol}"


def reference(q, k, prompt_len, window=10, h_lo=10, h_hi=100):
    d = q.shape[-1]
    return span_stats_reference(q.double(), k.double(), prompt_len, window, h_lo, h_hi, d**-0.5)


# (Hq, Hkv, N, prompt_len, h_hi, block): GQA with prompt length 1, response length 1,
# response shorter than h_lo, a short horizon, N = block - 1 / block + 1 with a prompt that
# puts the response on a block edge, the horizon to the end.
SINGLE = [
    (4, 2, 60, 1, 100, 16),
    (2, 1, 40, 39, 100, 16),
    (3, 3, 25, 18, 100, 16),
    (4, 1, 130, 7, 20, 32),
    (2, 2, 31, 1, 100, 32),
    (2, 2, 33, 16, None, 16),
    (4, 2, 160, 30, None, 32),
    (2, 1, 512, 100, 100, 64),
]


@pytest.mark.parametrize("hq,hkv,n,prompt_len,h_hi,block", SINGLE)
def test_single_sequence_matches_reference(interpret, hq, hkv, n, prompt_len, h_hi, block):
    q, k = random_qk(hq, hkv, n, 16, seed=n * 31 + hq)
    (got,) = span_stats_packed(
        q.float(), k.float(), [0, n], [prompt_len], h_hi=h_hi, block_m=block, block_n=block
    )
    assert_matches(got, reference(q, k, prompt_len, h_hi=h_hi), 1e-4)


@pytest.mark.parametrize("h_hi", [100, None])
def test_packed_varlen_matches_each_sequence(interpret, h_hi):
    # Unequal lengths: response 1, prompt 1, response 3 < h_lo, one spanning several blocks.
    lengths, prompts = [40, 17, 75, 33], [39, 1, 5, 30]
    n = sum(lengths)
    q, k = random_qk(4, 2, n, 16, seed=5)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    got = span_stats_packed(q.float(), k.float(), cu, torch.tensor(prompts), h_hi=h_hi,
                            block_m=16, block_n=32)  # fmt: skip
    assert len(got) == len(lengths)
    for b, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        ref = reference(q[:, lo:hi], k[:, lo:hi], prompts[b], h_hi=h_hi)
        assert_matches(got[b], ref, 1e-4)


@pytest.mark.parametrize("window,h_lo,h_hi", [(0, 0, 0), (1, 3, 5), (25, 1, None), (40, 50, 60)])
def test_other_parameters(interpret, window, h_lo, h_hi):
    q, k = random_qk(2, 1, 90, 16, seed=window + h_lo)
    (got,) = span_stats_packed(q.float(), k.float(), [0, 90], [9], window, h_lo, h_hi)
    assert_matches(got, reference(q, k, 9, window, h_lo, h_hi), 1e-4)


def test_front_dispatch_custom_scale_and_low_precision_inputs(interpret):
    q, k = random_qk(4, 2, 70, 16, seed=3)
    got = span_stats(q.float(), k.float(), 6, scale=0.05, backend="triton")
    ref = span_stats_reference(q, k, 6, 10, 10, 100, 0.05)
    assert_matches(got, ref, 1e-4)
    # 16-bit inputs accumulate in fp32: compare with the oracle on the rounded values.
    for dtype in (torch.bfloat16, torch.float16):
        qh, kh = q.to(dtype), k.to(dtype)
        got = span_stats(qh, kh, 6, backend="triton")
        assert_matches(got, reference(qh, kh, 6), 1e-4)


def test_deterministic_and_matches_chunked(interpret):
    q, k = random_qk(2, 1, 64, 16, seed=8)
    a = span_stats_packed(q.float(), k.float(), [0, 64], [4], block_m=16, block_n=16)[0]
    b = span_stats_packed(q.float(), k.float(), [0, 64], [4], block_m=16, block_n=16)[0]
    c = span_stats_chunked(q.float(), k.float(), 4, 10, 10, 100, 0.25)
    for field in FIELDS:
        assert torch.equal(getattr(a, field), getattr(b, field))  # no atomics
        assert rel_err(getattr(a, field), getattr(c, field)) <= 1e-5


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k = random_qk(2, 1, 20, 16, seed=1)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        span_stats(q.float(), k.float(), 3, backend="triton")


def test_missing_triton_is_a_clear_error(monkeypatch):
    import anchorcredit.engine.span.triton_kernel as mod

    monkeypatch.setattr(mod, "triton", None)
    q, k = random_qk(2, 1, 20, 16, seed=1)
    with pytest.raises(RuntimeError, match="needs the `triton` package"):
        span_stats(q.float(), k.float(), 3, backend="triton")


@pytest.mark.parametrize(
    "cu,prompts,match",
    [
        ([0, 10, 19], [2, 3], "end at total_N"),
        ([0, 10, 20], [2], "prompt lengths"),
        ([0, 10, 20], [10, 3], "sequence 0"),
        ([1, 10, 20], [2, 3], "start at 0"),
        ([0, 10, 20], [0, 3], "sequence 0"),
    ],
)
def test_packed_validation(interpret, cu, prompts, match):
    q, k = random_qk(2, 1, 20, 16, seed=1)
    with pytest.raises(ValueError, match=match):
        span_stats_packed(q.float(), k.float(), cu, prompts)


def test_rectangular_tiles(interpret):
    # Row blocks taller than key tiles and the reverse, through a two-sequence pack.
    q, k = random_qk(2, 1, 150, 16, seed=12)
    for bm, bn in ((64, 16), (16, 64)):
        got = span_stats_packed(q.float(), k.float(), [0, 61, 150], [20, 3], h_hi=30,
                                block_m=bm, block_n=bn)  # fmt: skip
        assert_matches(got[0], reference(q[:, :61], k[:, :61], 20, h_hi=30), 1e-4)
        assert_matches(got[1], reference(q[:, 61:], k[:, 61:], 3, h_hi=30), 1e-4)


def test_packed_rejects_bad_horizon_and_gqa(interpret):
    q, k = random_qk(3, 2, 20, 16, seed=1)
    with pytest.raises(ValueError, match="multiple"):
        span_stats_packed(q.float(), k.float(), [0, 20], [2])
    q, k = random_qk(2, 1, 20, 16, seed=1)
    with pytest.raises(ValueError, match="h_hi"):
        span_stats_packed(q.float(), k.float(), [0, 20], [2], h_lo=10, h_hi=5)
    with pytest.raises(ValueError, match="power of two"):
        span_stats_packed(q.float(), k.float(), [0, 20], [2], block_m=24)


# ---- GPU: bf16 at realistic lengths against float64 (skipped without CUDA) ----------------


def oracle_float64(q: torch.Tensor, k: torch.Tensor, prompt_len: int, h_hi: int | None):
    """The literal reference while N^2 fits; beyond, the float64 chunked path (itself checked
    against the reference to 1e-6 in tests/engine/span/test_backends.py)."""
    q, k = q.double(), k.double()
    if q.shape[1] <= 4096:
        return span_stats(q, k, prompt_len, h_hi=h_hi, backend="reference")
    return span_stats_chunked(q, k, prompt_len, 10, 10, h_hi, q.shape[-1] ** -0.5, 1 << 25)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1024, 4096, 8192, 16384, 32768])
def test_gpu_bf16_matches_float64(n):
    hq, hkv, d = 4, 2, 128  # Qwen3-8B's GQA ratio and head dim, fewer heads to keep it quick
    q, k = random_qk(hq, hkv, n, d, seed=n, device="cuda")
    qb, kb = q.bfloat16(), k.bfloat16()
    prompt_len = n // 4
    for h_hi in (100, None):
        got = span_stats(qb, kb, prompt_len, h_hi=h_hi, backend="triton")
        ref = oracle_float64(qb, kb, prompt_len, h_hi)
        assert_matches(got, ref, 2e-3)


@pytest.mark.gpu
def test_gpu_packed_varlen_bf16():
    lengths, prompts = [1000, 3001, 517, 64], [100, 2500, 1, 63]
    q, k = random_qk(8, 2, sum(lengths), 128, seed=2, device="cuda")
    qb, kb = q.bfloat16(), k.bfloat16()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    got = span_stats_packed(qb, kb, cu, prompts)
    for b in range(len(lengths)):
        lo, hi = int(cu[b]), int(cu[b + 1])
        assert_matches(got[b], oracle_float64(qb[:, lo:hi], kb[:, lo:hi], prompts[b], 100), 2e-3)


@pytest.mark.gpu
def test_gpu_fp32_and_fp16_inputs():
    q, k = random_qk(4, 1, 2048, 64, seed=4, device="cuda")
    assert_matches(span_stats(q.float(), k.float(), 300, backend="triton"),
                   oracle_float64(q, k, 300, 100), 1e-4)  # fmt: skip
    qh, kh = q.half(), k.half()
    got = span_stats(qh, kh, 300, backend="triton")
    assert_matches(got, oracle_float64(qh, kh, 300, 100), 2e-3)


def test_mixed_dtypes_overflow_and_huge_horizons(interpret):
    q, k = random_qk(2, 1, 40, 16, seed=4)
    with pytest.raises(ValueError, match="share a dtype"):
        span_stats_packed(q.bfloat16(), k.float(), [0, 40], [5])
    with pytest.raises(ValueError, match="overflow float32"):
        span_stats_packed(q * 1e300, k, [0, 40], [5])
    # Horizons past the sequence are clamped on the host (no int32 wrap in the kernel) and
    # mean the same as "to the end" / "never".
    got = span_stats_packed(q.float(), k.float(), [0, 40], [5], window=2**31, h_lo=3,
                            h_hi=2**31 - 1)[0]  # fmt: skip
    assert_matches(got, reference(q, k, 5, window=2**31, h_lo=3, h_hi=None), 1e-4)
    far = span_stats_packed(q.float(), k.float(), [0, 40], [5], h_lo=2**31, h_hi=2**31)[0]
    assert torch.count_nonzero(far.fai) == 0


def test_block_tables_are_one_cached_copy(interpret, monkeypatch):
    """One int32 table per batch layout (a single host-to-device copy), reused by every
    layer of the batch; the cache is bounded."""
    from anchorcredit.engine.span import plan as plan_mod
    from anchorcredit.engine.span import triton_kernel as mod

    monkeypatch.setattr(plan_mod, "_LAYOUTS", type(plan_mod._LAYOUTS)())
    monkeypatch.setattr(plan_mod, "LAYOUT_CACHE_SIZE", 2)
    monkeypatch.setattr(mod, "_PLANS", type(mod._PLANS)())
    q, k = random_qk(2, 1, 50, 16, seed=2)
    q, k = q.float(), k.float()
    first = mod.plan_packed(q, k, [0, 20, 50], [5, 3]).layout
    again = mod.plan_packed(q, k, [0, 20, 50], [5, 3], window=3, h_lo=1, h_hi=40).layout
    assert again is first  # a second layer of the same batch: no new table, no copy
    pieces = ("cu", "row_seq", "row_start", "col_seq", "col_start", "resp", "out_shift")
    storages = {getattr(first, p).untyped_storage().data_ptr() for p in pieces}
    assert len(storages) == 1 and first.cu.dtype == torch.int32
    assert first.cu.tolist() == [0, 20, 50] and first.offsets == (0, 15, 42)
    assert first.resp.tolist() == [*range(5, 20), *range(23, 50)]
    # a response position's slot among the batch's response positions
    assert first.out_shift.tolist() == [0 - 5, 15 - 23]
    other = mod.plan_packed(q, k, [0, 30, 50], [5, 3]).layout
    assert other is not first
    mod.plan_packed(q, k, [0, 50], [5])
    assert len(plan_mod._LAYOUTS) == 2 and all(v is not first for v in plan_mod._LAYOUTS.values())


def test_a_repeated_call_reuses_its_plan(interpret, monkeypatch):
    """The second layer of a batch plans nothing: same launch options and tables, new
    outputs, the new tensors bound; and it checks nothing again (a cached call signature
    was checked when first planned)."""
    from anchorcredit.engine.span import triton_kernel as mod

    monkeypatch.setattr(mod, "_PLANS", type(mod._PLANS)())
    q, k = random_qk(4, 2, 60, 16, seed=3)
    a = mod.plan_packed(q.float(), k.float(), [0, 25, 60], [5, 9], check_finite=False)
    q2, k2 = q.float() * 2, k.float()
    calls = []
    monkeypatch.setattr(mod, "_check_packed", lambda *a: calls.append(a))
    b = mod.plan_packed(q2, k2, [0, 25, 60], [5, 9], check_finite=False)
    assert calls == [] and len(mod._PLANS) == 1
    assert b.layout is a.layout and b.row.options == a.row.options and b.row.grid == a.row.grid
    assert b.row.args[0] is q2 and b.waad.data_ptr() != a.waad.data_ptr()
    b.run()
    for s, (lo, hi) in zip(b.collect(), [(0, 25), (25, 60)], strict=True):
        assert s.waad.shape == (4, hi - lo - (5 if lo == 0 else 9))


@pytest.mark.parametrize("col_tiles", [(16, 32), (64, 32)])  # (64, 32): the GPU band default
def test_column_pass_tiles_can_differ_from_the_row_pass(interpret, col_tiles):
    q, k = random_qk(2, 1, 120, 16, seed=6)
    got = span_stats_packed(q.float(), k.float(), [0, 50, 120], [7, 3], h_hi=30, block_m=32,
                            block_n=16, col_block_m=col_tiles[0],
                            col_block_n=col_tiles[1])  # fmt: skip
    assert_matches(got[0], reference(q[:, :50], k[:, :50], 7, h_hi=30), 1e-4)
    assert_matches(got[1], reference(q[:, 50:], k[:, 50:], 3, h_hi=30), 1e-4)
