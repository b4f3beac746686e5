"""The A/B report: the paired bootstrap, the per-arm table, resuming's log truncation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anchorcredit.experiments.config import build_config
from anchorcredit.experiments.report import paired_bootstrap, summarize, write_report
from anchorcredit.experiments.run_arm import last_checkpoint, truncate_after


def test_paired_bootstrap_matches_a_brute_force_replica():
    rng = np.random.default_rng(1)
    a = (rng.random((2, 10)) < 0.5).astype(float)
    b = (rng.random((2, 10)) < 0.3).astype(float)
    got = paired_bootstrap(a, b, n_boot=200, seed=3)
    r = np.random.default_rng(3)
    means, diffs = [], []
    for _ in range(200):
        si, pi = r.integers(0, 2, 2), r.integers(0, 10, 10)
        means.append(a[np.ix_(si, pi)].mean())
        diffs.append(a[np.ix_(si, pi)].mean() - b[np.ix_(si, pi)].mean())
    assert got["acc"] == a.mean() and got["diff"] == a.mean() - b.mean()
    assert got["acc_ci"] == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert got["diff_ci"] == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))


def test_identical_arms_differ_by_exactly_zero():
    a = np.array([[1.0, 0.0, 1.0, 1.0]])
    d = paired_bootstrap(a, a.copy(), n_boot=50)
    assert d["diff"] == 0.0 and d["diff_ci"] == (0.0, 0.0)  # paired: same resamples


def _write(run, steps, evals):
    run.mkdir(parents=True)
    (run / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))


def test_summary_reads_run_folders_and_pairs_arms_on_the_last_evaluation(tmp_path):
    cfg = build_config("cpu", {"arms": ("grpo", "coupled_rhythm"), "seeds": (0,)})
    steps = [{"step": i, "reward": 0.1 * i, "step_seconds": 2.0} for i in (1, 2, 3, 4)]
    credit = [
        s | {"anchorcredit/gamma_mean": 1.2, "anchorcredit/amplified_fraction": 0.4} for s in steps
    ]
    _write(
        tmp_path / "runs" / "grpo-s0",
        steps,
        [{"step": 0, "test_accuracy": 0, "test_reward": 0.275, "test_rewards": [0, 0.1, 0, 1]}]
        + [
            {"step": 4, "test_accuracy": 0.25, "test_reward": 0.275, "test_rewards": [1, 0.1, 0, 0]}
        ],
    )
    _write(
        tmp_path / "runs" / "coupled_rhythm-s0",
        credit,
        [{"step": 4, "test_accuracy": 0.5, "test_reward": 0.525, "test_rewards": [1, 1, 0, 0.1]}],
    )
    rows = {r["arm"]: r for r in summarize(tmp_path, cfg)}
    assert rows["grpo"]["acc"] == 0.25  # the last evaluation, 0.1 is not solved
    assert rows["coupled_rhythm"]["acc"] == 0.5
    assert rows["coupled_rhythm"]["acc_diff"] == 0.25 and "acc_diff" not in rows["grpo"]
    assert rows["grpo"]["reward"] == pytest.approx(1.1 / 4)
    assert rows["coupled_rhythm"]["reward_diff"] == pytest.approx(1.0 / 4)
    assert rows["grpo"]["eval_step"] == [4]
    assert rows["grpo"]["train_reward"] == pytest.approx(0.35)  # steps 3, 4
    assert rows["coupled_rhythm"]["gamma_mean"] == pytest.approx(1.2)
    assert rows["grpo"]["gamma_mean"] is None
    write_report(tmp_path, cfg)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "coupled_rhythm" in (tmp_path / "report.html").read_text()


def test_resume_helpers_drop_lines_after_the_checkpoint_and_find_the_last_complete_one(tmp_path):
    log = tmp_path / "steps.jsonl"
    log.write_text("".join(json.dumps({"step": i}) + "\n" for i in (1, 2, 3)))
    truncate_after(log, 2)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
    for n in (1, 2, 10):
        (tmp_path / f"checkpoint-{n}").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text("{}")
    # checkpoint-10 has no trainer_state.json: a save cut short, not resumable
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
