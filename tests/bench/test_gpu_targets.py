"""bench/gpu_targets.py judges the span kernel's targets from a GPU suite report: reports
built here from the span benchmark's own table code, so a change to either that would blind
the verdict fails here, without a GPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # their dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gpu_targets = _load("gpu_targets")
benchmark = _load("span_benchmark")
SINGLE = (1024, 4096, 8192, 16384, 32768)


def bench_rows(kernel_ms, h_hi, fa2_ms=1.0, sdpa_ms=1.2, err=1e-4, spread=0.02, whole=1.1):
    """One horizon's rows at every judged size: single sequences and the packed batch."""
    rows = []
    for n, batch in [*((n, 1) for n in SINGLE), (1024, 512)]:
        at = {"n": n, "h_hi": h_hi, "batch": batch}
        if batch == 1:
            rows += [
                {**at, "backend": "sdpa_flash", "ms": sdpa_ms, "mib": 10.0, "err": None},
                {**at, "backend": "sdpa_cudnn", "ms": sdpa_ms * 0.9, "mib": 10.0, "err": None},
                {**at, "backend": "fa2", "ms": fa2_ms, "mib": 10.0, "err": None},
            ]
        else:  # the packed batch: torch's varlen flash attention is base and FA2
            rows += [{**at, "backend": "varlen", "ms": fa2_ms, "mib": 10.0, "err": None}]
        for suffix in ("", "_lse"):
            rows += [
                {**at, "backend": f"triton_kernel{suffix}", "ms": kernel_ms, "mib": 5.0,
                 "err": err, "spread": spread},
                {**at, "backend": f"triton{suffix}", "ms": kernel_ms * whole, "mib": 5.0,
                 "err": err, "spread": spread},
            ]  # fmt: skip
    return rows


def report(tmp_path: Path, rows: list[dict]) -> Path:
    text = ["# GPU suite", "", "## span kernel step", "", "`cmd` (rc 0, 9 s)", ""]
    text += benchmark.table(rows, "cuda")
    text += ["", "<details><summary>log tail</summary>", "</details>", ""]
    path = tmp_path / "gpu_suite.md"
    path.write_text("\n".join(text))
    return path


def run(path: Path) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_targets.py"), str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return out.returncode, out.stdout


def test_every_target_met(tmp_path):
    rc, out = run(report(tmp_path, bench_rows(0.40, 100) + bench_rows(0.55, None)))
    assert rc == 0, out
    judged = len(gpu_targets.SIZES) * 2  # per kind: every size at both horizons
    assert out.count("| met |") == 2 * judged
    assert "kernel: 0 judged row(s) missed a target; whole call: 0 missed." in out
    # the kernel and whole-call rows judged apart, the two-pass end rows shown beside
    assert "| kernel | 100 | 1024 | triton_kernel | 0.400 |" in out
    assert "| whole call | end | 512x1024 | triton_lse | 0.605 |" in out
    assert "| kernel | end | 32768 | triton_kernel | 0.550 | 2.0 | 0.55 |" in out
    # shown beside, per kind: the one-pass rows at h_hi=100, the two-pass rows at end
    assert out.count("| (met) |") == 4 * len(gpu_targets.SIZES)


@pytest.mark.parametrize(
    "rows,why",
    [
        # 0.55x FA2 at the band horizon: FA2's target missed, SDPA's (0.55/1.08) met.
        (bench_rows(0.55, 100) + bench_rows(0.6, None), "time x fa2 0.55 > 0.50"),
        # FA2 fine but the fastest SDPA (cuDNN, 0.5 ms) is beaten by only 0.9x.
        (bench_rows(0.45, 100, sdpa_ms=0.5 / 0.9) + bench_rows(0.6, None), "time x base"),
        (bench_rows(0.45, 100) + bench_rows(0.75, None), "time x fa2 0.75 > 0.70"),
        (bench_rows(0.45, 100, err=5e-3) + bench_rows(0.6, None), "error 5.0e-03 > 2e-03"),
    ],
)
def test_a_missed_target_fails_and_says_why(tmp_path, rows, why):
    rc, out = run(report(tmp_path, rows))
    assert rc == 1 and why in out, out


def test_host_overhead_fails_the_whole_call_only(tmp_path):
    """The launches meet the target, the call does not: the verdict names the whole call."""
    rows = bench_rows(0.40, 100, whole=1.5) + bench_rows(0.55, None)
    rc, out = run(report(tmp_path, rows))
    assert rc == 1
    assert f"kernel: 0 judged row(s) missed a target; whole call: {len(gpu_targets.SIZES)}" in out


def test_a_spread_across_the_bound_is_marked_borderline(tmp_path):
    rows = bench_rows(0.48, 100, spread=0.10, whole=1.0) + bench_rows(0.55, None)
    rc, out = run(report(tmp_path, rows))
    assert rc == 0 and "met (borderline: the spread crosses a bound)" in out, out


def test_a_size_not_measured_fails(tmp_path):
    band = [r for r in bench_rows(0.4, 100)
            if not (r["n"] == 32768 and r["backend"] == "triton_kernel")]  # fmt: skip
    rc, out = run(report(tmp_path, band + bench_rows(0.6, None)))
    assert rc == 1 and "not measured: kernel triton_kernel h_hi=100 N=32768" in out, out
    errored = bench_rows(0.4, 100)
    errored[3] = {"n": 1024, "h_hi": 100, "backend": "triton_kernel", "error": "out of memory"}
    rc, out = run(report(tmp_path, errored + bench_rows(0.6, None)))
    assert rc == 1 and "not measured (out of memory)" in out, out


def test_no_table_is_not_a_pass(tmp_path):
    path = tmp_path / "gpu_suite.md"
    path.write_text("# GPU suite\n\n## one 32K-token sequence\n\n| a | b |\n")
    rc, out = run(path)
    assert rc == 2 and "no span benchmark table" in out
