"""The span benchmark runs (tiny size, CPU) and prints its table, so it cannot rot."""

from __future__ import annotations

from anchorcredit.engine.span import benchmark


def test_benchmark_main_prints_the_cpu_table(capsys):
    rc = benchmark.main(["--device", "cpu", "cuda", "--n", "48", "--reps", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    header = "| N | backend | ms | peak MiB | time x base | memory x base | max rel err |"
    assert header in lines
    rows = [line.split(" | ") for line in lines if line.startswith("| 48 |")]
    assert [r[1] for r in rows] == ["reference", "chunked"]
    for r in rows:
        assert len(r) == len(benchmark.COLUMNS)
        assert float(r[-1].rstrip(" |")) <= 1e-5  # N <= --err-max-n: error vs float64
    assert rows[0][4] == "1.00"  # the CPU baseline is the reference
    if "cuda: skipped" not in out:  # a GPU box: its table follows
        assert "| sdpa_flash |" in out and "| triton |" in out
