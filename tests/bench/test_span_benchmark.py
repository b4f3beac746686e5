"""The span benchmark (bench/span_benchmark.py) runs (tiny size, CPU) and prints its table,
its CUDA rows are the calls they claim to be (under the interpreter), and its table's ratios
and spread are right, so it cannot rot without a GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from anchorcredit.engine.span.reference import max_relative_error, span_stats_reference

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("span_benchmark", ROOT / "bench/span_benchmark.py")
benchmark = importlib.util.module_from_spec(_spec)
sys.modules["span_benchmark"] = benchmark
_spec.loader.exec_module(benchmark)


def test_benchmark_main_prints_the_cpu_table(capsys):
    rc = benchmark.main(["--device", "cpu", "cuda", "--n", "48", "--reps", "1", "--threads", "1",
                         "--h-hi", "100", "end"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    assert "| " + " | ".join(benchmark.COLUMNS) + " |" in lines
    rows = [line.split(" | ") for line in lines if line.startswith("| 48 |")]
    assert [(r[1], r[2]) for r in rows] == [
        ("100", "reference"),
        ("100", "chunked"),
        ("end", "reference"),
        ("end", "chunked"),
    ]
    for r in rows:
        assert len(r) == len(benchmark.COLUMNS)
        assert float(r[-1].rstrip(" |")) <= 1e-5  # N <= --err-max-n: error vs float64
        if r[2] == "reference":
            assert r[6] == "1.00"  # the CPU baseline
    if "cuda: skipped" not in out:  # a GPU box: its table follows
        assert "(base) |" in out and "| triton |" in out and "| triton_kernel |" in out


def test_cuda_table_uses_the_fastest_sdpa_and_fa2():
    rows = [
        {"n": 8, "h_hi": 100, "backend": "sdpa_flash", "ms": 2.0, "mib": 10.0, "err": None},
        {"n": 8, "h_hi": 100, "backend": "sdpa_cudnn", "ms": 1.0, "mib": 20.0, "err": None},
        {"n": 8, "h_hi": 100, "backend": "sdpa_efficient", "error": "No available kernel"},
        {"n": 8, "h_hi": 100, "backend": "fa2", "ms": 4.0, "mib": 5.0, "err": None},
        {"n": 8, "h_hi": 100, "backend": "triton", "ms": 0.5, "mib": 2.0, "err": 1e-6,
         "spread": 0.04},
    ]  # fmt: skip
    lines = benchmark.table(rows, "cuda")
    cells = {r.split(" | ")[2]: r.split(" | ") for r in lines[2:]}
    assert "sdpa_cudnn (base)" in cells and "sdpa_flash" in cells
    assert cells["triton"][3:9] == ["0.500", "4.0", "2", "0.50", "0.10", "0.12"]
    assert cells["sdpa_efficient"][3] == "No available kernel"
    assert all(len(r.split(" | ")) == len(benchmark.COLUMNS) for r in lines[2:])


def test_fa2_column_falls_back_to_pytorchs_flash_and_a_batch_to_varlen():
    """Without flash_attn (the GPU box's image has none) the FA2 column reads sdpa_flash,
    PyTorch's FlashAttention-2 (varlen for a packed batch); with it, flash_attn's row wins."""
    rows = [
        {"n": 8, "h_hi": None, "backend": "sdpa_flash", "ms": 2.0, "mib": 10.0, "err": None},
        {"n": 8, "h_hi": None, "backend": "sdpa_cudnn", "ms": 1.0, "mib": 20.0, "err": None},
        {"n": 8, "h_hi": None, "backend": "triton", "ms": 0.5, "mib": 2.0, "err": 1e-6},
    ]
    cells = {r.split(" | ")[2]: r.split(" | ") for r in benchmark.table(rows, "cuda")[2:]}
    assert cells["triton"][8] == "0.25" and cells["triton"][1] == "end"  # 0.5 / sdpa_flash
    with_fa2 = [*rows, {"n": 8, "h_hi": None, "backend": "fa2", "ms": 4.0, "mib": 5.0,
                        "err": None}]  # fmt: skip
    cells = {r.split(" | ")[2]: r.split(" | ") for r in benchmark.table(with_fa2, "cuda")[2:]}
    assert cells["triton"][8] == "0.12"
    batch = [
        {"n": 8, "h_hi": 100, "batch": 4, "backend": "varlen", "ms": 2.0, "mib": 1.0, "err": None},
        {"n": 8, "h_hi": 100, "batch": 4, "backend": "triton", "ms": 1.0, "mib": 1.0, "err": None},
    ]  # fmt: skip
    cells = {r.split(" | ")[2]: r.split(" | ") for r in benchmark.table(batch, "cuda")[2:]}
    assert cells["varlen (base)"][0] == "| 4x8" and cells["triton"][6:9] == ["0.50", "1.00", "0.50"]


def test_cuda_table_is_printed_one_size_at_a_time(monkeypatch, capsys):
    """A GPU step cut short by its time limit must still leave the sizes it finished: the
    header first, then each N's rows as soon as that N is done."""
    pytest.importorskip("triton")
    seen_before_second = []

    def fake_bench(args, cfg, on_size):
        for n in (1024, 4096):
            rows = [
                {"n": n, "h_hi": 100, "backend": "sdpa_flash", "ms": 2.0, "mib": 1.0, "err": None},
                {"n": n, "h_hi": 100, "backend": "triton", "ms": 1.0, "mib": 1.0, "err": None},
            ]
            on_size(rows)
            if n == 1024:
                seen_before_second.append(capsys.readouterr().out)
        return []

    monkeypatch.setattr(benchmark.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(benchmark.torch.cuda, "get_device_name", lambda: "fake GPU")
    monkeypatch.setattr(benchmark, "bench_cuda", fake_bench)
    assert benchmark.main(["--device", "cuda"]) == 0
    first, rest = seen_before_second[0], capsys.readouterr().out
    assert first.count("| N | h_hi | backend |") == 1 and "| 1024 | 100 | triton | 1.000 |" in first
    assert "| 4096 | 100 | triton | 1.000 | - | 1 | 0.50 |" in rest
    assert "| N | h_hi |" not in rest


def test_repeats_give_the_median_and_the_spread(monkeypatch):
    pytest.importorskip("triton")
    import triton.testing

    times = iter([1.0, 1.2, 0.9])
    monkeypatch.setattr(triton.testing, "do_bench", lambda call, return_mode: next(times))
    ms, spread = benchmark.time_call(lambda: None, 3)
    assert ms == 1.0 and spread == pytest.approx(0.3)


def test_cuda_rows_of_a_run(monkeypatch):
    args = benchmark.parse_args(["--device", "cuda", "--lse", "--band-fold", "--h-hi", "100"])
    rows = benchmark.cuda_backends(args, 100, 1)
    assert rows[:3] == list(benchmark.SDPA)
    for row in ("triton", "triton_kernel", "triton_lse", "triton_kernel_lse", "triton_fold"):
        assert row in rows
    assert "triton_fold" not in benchmark.cuda_backends(args, None, 1)  # a finite h_hi only
    packed = benchmark.cuda_backends(args, None, 512)
    assert packed[0] == "varlen" and "chunked" not in packed and "eager" not in packed
    only = benchmark.parse_args(["--backends", "triton", "varlen", "--batch", "4"])
    assert benchmark.cuda_backends(only, 100, 4) == ["varlen", "triton"]


# ---- the rows are the calls they name (the kernel under the interpreter) -------------------


def _qk(n=48, hq=4, hkv=2, d=16):
    gen = torch.Generator().manual_seed(2)
    return (torch.randn(hq, n, d, generator=gen), torch.randn(hkv, n, d, generator=gen))


def _reference(q, k, prompt, h_hi):
    return span_stats_reference(q.double(), k.double(), prompt, 10, 10, h_hi, q.shape[-1] ** -0.5)


@pytest.mark.parametrize("h_hi", [30, None])
def test_triton_rows_compute_the_statistics(interpret, h_hi):
    pytest.importorskip("triton")
    from anchorcredit.engine.span import fallback

    args = benchmark.parse_args(["--device", "cuda", "--lse", "--band-fold", "--gqa-pack"])
    cfg = benchmark.config_for("cuda", args)
    q, k = _qk(96)
    cu, prompts = [0, 40, 96], [5, 3]
    before = fallback.total()
    for backend in benchmark.cuda_backends(args, h_hi, 2):
        if not backend.startswith("triton"):
            continue
        call = benchmark.stats_fn(backend, q, k, cu, prompts, cfg, h_hi)
        got = call()
        if backend.startswith("triton_kernel"):  # plan.run: the launches alone
            plan = call.__self__
            assert plan.one_pass == backend.endswith("_lse")
            assert ("GQA_PACK" in plan.row.options) == backend.endswith("_gqa")
            got = plan.collect()
        for b, (lo, hi) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
            ref = _reference(q[:, lo:hi], k[:, lo:hi], prompts[b], h_hi)
            assert max_relative_error(got[b], ref) <= 1e-4, backend
    assert fallback.total() == before  # every row ran the kernel, none fell back


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
