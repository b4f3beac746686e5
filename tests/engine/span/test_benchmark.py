"""The span benchmark runs (tiny size, CPU) and prints its table, so it cannot rot."""

from __future__ import annotations

import pytest

from anchorcredit.engine.span import benchmark


def test_benchmark_main_prints_the_cpu_table(capsys):
    rc = benchmark.main(["--device", "cpu", "cuda", "--n", "48", "--reps", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    header = (
        "| N | backend | ms | peak MiB | time x base | memory x base | time x fa2 | max rel err |"
    )
    assert header in lines
    rows = [line.split(" | ") for line in lines if line.startswith("| 48 |")]
    assert [r[1] for r in rows] == ["reference", "chunked"]
    for r in rows:
        assert len(r) == len(benchmark.COLUMNS)
        assert float(r[-1].rstrip(" |")) <= 1e-5  # N <= --err-max-n: error vs float64
    assert rows[0][4] == "1.00"  # the CPU baseline is the reference
    if "cuda: skipped" not in out:  # a GPU box: its table follows
        assert "(base) |" in out and "| triton |" in out and "| triton_kernel |" in out


def test_cuda_table_uses_the_fastest_sdpa_and_fa2():
    rows = [
        {"n": 8, "backend": "sdpa_flash", "ms": 2.0, "mib": 10.0, "err": None},
        {"n": 8, "backend": "sdpa_cudnn", "ms": 1.0, "mib": 20.0, "err": None},
        {"n": 8, "backend": "sdpa_efficient", "error": "No available kernel"},
        {"n": 8, "backend": "fa2", "ms": 4.0, "mib": 5.0, "err": None},
        {"n": 8, "backend": "triton", "ms": 0.5, "mib": 2.0, "err": 1e-6},
    ]
    lines = benchmark.table(rows, "cuda")
    cells = {r.split(" | ")[1]: r.split(" | ") for r in lines[2:]}
    assert "sdpa_cudnn (base)" in cells and "sdpa_flash" in cells
    assert cells["triton"][4:7] == ["0.50", "0.10", "0.12"]  # time/memory x cudnn, time x fa2
    assert cells["sdpa_efficient"][2] == "No available kernel"
    assert all(len(r.split(" | ")) == len(benchmark.COLUMNS) for r in lines[2:])


def test_fa2_column_falls_back_to_pytorchs_flash_backend():
    """Without flash_attn (the GPU box's image has none) the FA2 column reads sdpa_flash,
    PyTorch's FlashAttention-2; with it, flash_attn's own row wins."""
    rows = [
        {"n": 8, "backend": "sdpa_flash", "ms": 2.0, "mib": 10.0, "err": None},
        {"n": 8, "backend": "sdpa_cudnn", "ms": 1.0, "mib": 20.0, "err": None},
        {"n": 8, "backend": "triton", "ms": 0.5, "mib": 2.0, "err": 1e-6},
    ]
    cells = {r.split(" | ")[1]: r.split(" | ") for r in benchmark.table(rows, "cuda")[2:]}
    assert cells["triton"][6] == "0.25"  # 0.5 / sdpa_flash's 2.0
    with_fa2 = [*rows, {"n": 8, "backend": "fa2", "ms": 4.0, "mib": 5.0, "err": None}]
    cells = {r.split(" | ")[1]: r.split(" | ") for r in benchmark.table(with_fa2, "cuda")[2:]}
    assert cells["triton"][6] == "0.12"


def test_cuda_table_is_printed_one_size_at_a_time(monkeypatch, capsys):
    """A GPU step cut short by its time limit must still leave the sizes it finished: the
    header first, then each N's rows as soon as that N is done."""
    pytest.importorskip("triton")
    seen_before_second = []

    def fake_bench(args, cfg, on_size):
        for n in (1024, 4096):
            rows = [
                {"n": n, "backend": "sdpa_flash", "ms": 2.0, "mib": 1.0, "err": None},
                {"n": n, "backend": "triton", "ms": 1.0, "mib": 1.0, "err": None},
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
    assert first.count("| N | backend |") == 1 and "| 1024 | triton | 1.00 |" in first
    assert "| 4096 | triton | 1.00 | 1 | 0.50 |" in rest and "| N | backend |" not in rest
