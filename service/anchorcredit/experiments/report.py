"""The A/B report: a table with bootstrap intervals, learning curves (PNG), one HTML page.

Per arm, pooled over its seeds:
    final test accuracy  share of (seed, test problem) pairs solved at the last evaluation;
                         interval: percentile bootstrap resampling test problems (the same
                         problems for every arm) and seeds;
    final test reward    the same for the mean reward (0.1 for a well-formed wrong answer:
                         at small scale the only part that moves);
    vs grpo              the difference to the plain GRPO arm, bootstrapped *paired* (the
                         same resampled problems and seeds for both arms);
    train reward         mean reward over the second half of the steps; interval resampling
                         steps within each seed;
    gamma, amplified     mean of the per-step credit summary (service arms only);
    score s, push s      mean seconds per step spent scoring and pushing weights.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from anchorcredit.experiments.config import ExperimentConfig

N_BOOT = 2000
SEED = 0


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def load_runs(out: Path, cfg: ExperimentConfig) -> dict[str, dict[int, dict[str, list]]]:
    """arm -> seed -> {"steps": [...], "eval": [...]} for every run folder that has data."""
    runs: dict[str, dict[int, dict[str, list]]] = {}
    for arm in cfg.arms:
        for seed in cfg.seeds:
            d = out / "runs" / f"{arm}-s{seed}"
            steps, evals = _lines(d / "steps.jsonl"), _lines(d / "eval.jsonl")
            if steps or evals:
                runs.setdefault(arm, {})[seed] = {"steps": steps, "eval": evals}
    return runs


def final_matrix(
    seeds: dict[int, dict[str, list]], common: list[int], solved: bool = True
) -> np.ndarray | None:
    """[seeds, problems] at the last evaluation: 0/1 solved (solved=True) or the reward."""
    rows = []
    for s in common:
        ev = seeds[s]["eval"]
        if not ev:
            return None
        rewards = ev[-1]["test_rewards"]
        rows.append([1.0 if r == 1.0 else 0.0 for r in rewards] if solved else rewards)
    return np.asarray(rows, dtype=np.float64) if rows else None


def paired_bootstrap(a: np.ndarray, b: np.ndarray | None, n_boot: int = N_BOOT, seed: int = SEED):
    """(mean of a, CI) and, if b is given, (mean a - b, CI), resampling seeds and problems."""
    rng = np.random.default_rng(seed)
    n_s, n_p = a.shape
    means, diffs = [], []
    for _ in range(n_boot):
        si = rng.integers(0, n_s, n_s)
        pi = rng.integers(0, n_p, n_p)
        means.append(a[np.ix_(si, pi)].mean())
        if b is not None:
            diffs.append(a[np.ix_(si, pi)].mean() - b[np.ix_(si, pi)].mean())
    ci = lambda v: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))  # noqa: E731
    out = {"acc": float(a.mean()), "acc_ci": ci(means)}
    if b is not None:
        out |= {"diff": float(a.mean() - b.mean()), "diff_ci": ci(diffs)}
    return out


def train_reward(seeds: dict[int, dict[str, list]], n_boot: int = N_BOOT, seed: int = SEED):
    """Mean reward over each seed's second half of steps, with a step-resampling interval."""
    halves = [
        np.array([r["reward"] for r in v["steps"]][len(v["steps"]) // 2 :]) for v in seeds.values()
    ]
    halves = [h for h in halves if h.size]
    if not halves:
        return None, None
    rng = np.random.default_rng(seed)
    boots = [
        np.mean([h[rng.integers(0, h.size, h.size)].mean() for h in halves]) for _ in range(n_boot)
    ]
    return float(np.mean([h.mean() for h in halves])), (
        float(np.percentile(boots, 2.5)),
        float(np.percentile(boots, 97.5)),
    )


def _mean_of(seeds: dict[int, dict[str, list]], key: str) -> float | None:
    vals = [r[key] for v in seeds.values() for r in v["steps"] if key in r]
    return float(np.mean(vals)) if vals else None


def summarize(out: Path, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """One row per arm (module docstring)."""
    runs = load_runs(out, cfg)
    base = runs.get("grpo", {})
    rows = []
    for arm, seeds in runs.items():
        common = sorted(s for s in seeds if s in base and base[s]["eval"] and seeds[s]["eval"])
        row: dict[str, Any] = {
            "arm": arm,
            "seeds": sorted(seeds),
            "steps": [len(v["steps"]) for v in seeds.values()],
        }
        for solved, name in ((True, "acc"), (False, "reward")):
            evaluated = sorted(s for s in seeds if seeds[s]["eval"])
            mine = final_matrix(seeds, evaluated, solved)
            if mine is not None and mine.size:
                d = paired_bootstrap(mine, None)
                row |= {name: d["acc"], f"{name}_ci": d["acc_ci"]}
            if arm != "grpo" and common:
                a, b = final_matrix(seeds, common, solved), final_matrix(base, common, solved)
                if a is not None and b is not None:
                    d = paired_bootstrap(a, b)
                    row |= {f"{name}_diff": d["diff"], f"{name}_diff_ci": d["diff_ci"]}
        row["eval_step"] = [v["eval"][-1]["step"] for v in seeds.values() if v["eval"]]
        row["train_reward"], row["train_reward_ci"] = train_reward(seeds)
        for key, name in (
            ("anchorcredit/gamma_mean", "gamma_mean"),
            ("anchorcredit/amplified_fraction", "amplified_fraction"),
            ("anchorcredit/score_seconds", "score_s"),
            ("push_seconds", "push_s"),
            ("step_seconds", "step_s"),
        ):
            row[name] = _mean_of(seeds, key)
        rows.append(row)
    return rows


def _fmt(v: Any, ci: Any = None, pct: bool = False, digits: int = 3) -> str:
    if v is None:
        return "-"
    f = (lambda x: f"{x * 100:.1f}%") if pct else (lambda x: f"{x:.{digits}f}")
    return f(v) + (f" [{f(ci[0])}, {f(ci[1])}]" if ci else "")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table (also embedded in the HTML)."""
    head = (
        "| arm | seeds | steps | final test accuracy [95% CI] | vs grpo [95% CI] | "
        "final test reward [95% CI] | vs grpo [95% CI] | train reward, 2nd half [95% CI] | "
        "gamma mean | amplified | score s/step | push s/step | step s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in rows:
        vs = r["arm"] != "grpo"
        body += (
            f"| {r['arm']} | {','.join(map(str, r['seeds']))} | "
            f"{','.join(map(str, r['steps']))} | "
            f"{_fmt(r.get('acc'), r.get('acc_ci'), pct=True)} | "
            f"{_fmt(r.get('acc_diff'), r.get('acc_diff_ci'), pct=True) if vs else '-'} | "
            f"{_fmt(r.get('reward'), r.get('reward_ci'))} | "
            f"{_fmt(r.get('reward_diff'), r.get('reward_diff_ci')) if vs else '-'} | "
            f"{_fmt(r['train_reward'], r['train_reward_ci'])} | {_fmt(r['gamma_mean'])} | "
            f"{_fmt(r['amplified_fraction'], pct=True)} | {_fmt(r['score_s'], digits=2)} | "
            f"{_fmt(r['push_s'], digits=2)} | {_fmt(r['step_s'], digits=1)} |\n"
        )
    return head + body


def plot(out: Path, cfg: ExperimentConfig, path: Path) -> None:
    """Learning curves: train reward per step, test accuracy and test reward per
    evaluation, each the mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(out, cfg)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    for arm, seeds in runs.items():
        curves = [[r["reward"] for r in v["steps"]] for v in seeds.values() if v["steps"]]
        if curves:
            n = min(len(c) for c in curves)
            ax1.plot(
                range(1, n + 1), np.mean([c[:n] for c in curves], axis=0), label=arm, marker="."
            )
        evals = [v["eval"] for v in seeds.values() if v["eval"]]
        if evals:
            n = min(len(e) for e in evals)
            xs = [e["step"] for e in evals[0][:n]]
            for ax, key in ((ax2, "test_accuracy"), (ax3, "test_reward")):
                ys = np.mean([[e[key] for e in ev[:n]] for ev in evals], axis=0)
                ax.plot(xs, ys, label=arm, marker="o", alpha=0.8)
    ax1.set(xlabel="step", ylabel="mean train reward", title="train reward (mean over seeds)")
    ax2.set(xlabel="step", ylabel="test accuracy", title="greedy test accuracy (solved share)")
    ax3.set(xlabel="step", ylabel="mean test reward", title="greedy test reward (0.1 = format)")
    for ax in (ax1, ax2, ax3):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """summary.json, curves.png and report.html in `out`; returns the summary rows."""
    rows = summarize(out, cfg)
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(out, cfg, out / "curves.png")
    table = markdown_table(rows)
    cells = [line.strip("|").split("|") for line in table.strip().splitlines()]
    trs = "".join(
        "<tr>"
        + "".join(
            f"<{'th' if i == 0 else 'td'}>{html.escape(c.strip())}</{'th' if i == 0 else 'td'}>"
            for c in row
        )
        + "</tr>"
        for i, row in enumerate(cells)
        if i != 1
    )
    page = (
        "<!doctype html><meta charset='utf-8'><title>anchorcredit countdown A/B</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "td,th{border:1px solid #ccc;padding:4px 8px}table{border-collapse:collapse}</style>"
        f"<h1>Countdown A/B ({html.escape(cfg.preset)} preset)</h1>"
        f"<table>{trs}</table><p><img src='curves.png' width='100%'></p>"
        f"<h2>config</h2><pre>{html.escape(cfg.to_json())}</pre>"
    )
    (out / "report.html").write_text(page)
    return rows
