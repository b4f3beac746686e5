"""`anchorcredit experiment countdown --preset smoke` end to end, and resuming a killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("reasoning_gym")

from anchorcredit.cli import main  # noqa: E402


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_smoke_preset_runs_every_arm_against_a_real_server(tmp_path, capsys):
    out = tmp_path / "ab"
    assert main(["experiment", "countdown", "--preset", "smoke", "--out", str(out)]) == 0
    for arm in ("grpo", "random", "entropy", "coupled_rhythm"):
        run = out / "runs" / f"{arm}-s0"
        steps = _lines(run / "steps.jsonl")
        assert [r["step"] for r in steps] == [1, 2]
        assert all("reward" in r and r["step_seconds"] > 0 for r in steps)
        evals = _lines(run / "eval.jsonl")
        assert [e["step"] for e in evals] == [0, 1, 2]
        assert all(len(e["test_rewards"]) == 2 for e in evals)
        if arm == "grpo":
            assert not any("anchorcredit/gamma_mean" in r for r in steps)
        else:  # scored by the service, with the weights pushed after every step
            assert all(r["anchorcredit/gamma_mean"] >= 1.0 for r in steps)
            assert all(r["anchorcredit/policy_step"] == r["step"] - 1 for r in steps)
            assert all(r["push_seconds"] > 0 for r in steps)
        assert (run / "done.json").is_file()
    served = (out / "serve.log").read_text()
    assert "loaded in" in served
    rows = json.loads((out / "summary.json").read_text())
    assert [r["arm"] for r in rows] == ["grpo", "random", "entropy", "coupled_rhythm"]
    assert all(0.0 <= r["acc"] <= 1.0 for r in rows)
    assert "acc_diff" in rows[1] and "acc_diff" not in rows[0]
    assert (out / "curves.png").stat().st_size > 1000
    assert "<table>" in (out / "report.html").read_text()
    # a rerun of a finished experiment trains nothing and refuses a different plan
    before = (out / "runs" / "grpo-s0" / "steps.jsonl").read_text()
    assert main(["experiment", "countdown", "--preset", "smoke", "--out", str(out)]) == 0
    assert (out / "runs" / "grpo-s0" / "steps.jsonl").read_text() == before
    argv = ["experiment", "countdown", "--preset", "smoke", "--out", str(out)]
    assert main([*argv, "--learning-rate", "0.5"]) == 2
    assert "other settings (learning_rate)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_run_continues_from_its_last_completed_step(tmp_path):
    out = tmp_path / "ab"
    argv = ["experiment", "countdown", "--preset", "smoke", "--out", str(out)]
    argv += ["--arms", "grpo", "--steps", "4"]
    cli = "import sys; from anchorcredit.cli import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", cli, *argv],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run = out / "runs" / "grpo-s0"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if (run / "checkpoint-1" / "trainer_state.json").is_file() or proc.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (run / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (run / "done.json").is_file()
    first = _lines(run / "steps.jsonl")[0]
    assert first["step"] == 1
    assert main(argv) == 0
    steps = _lines(run / "steps.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0] == first  # step 1 was not redone: the run continued after it
    assert [e["step"] for e in _lines(run / "eval.jsonl")] == [0, 1, 2, 3, 4]
    assert json.loads((run / "done.json").read_text()) == {"steps": 4}
