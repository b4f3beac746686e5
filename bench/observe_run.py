"""A training-shaped run through the service, watched by a real Prometheus; plots the series
the dashboard shows (docs/OBSERVABILITY.md's figure).

    python bench/observe_run.py                         # embedded SmolLM2, 50 steps, CPU
    python bench/observe_run.py --model path/to/ckpt --steps 100 --stall-after 60

It starts `anchorcredit serve` and Prometheus (scraping every second, the alert rules of
deploy/monitoring loaded), then plays a trainer: each step scores the responses of
examples/demo.jsonl (tokenised with the model's tokenizer, a shuffled batch) with
coupled_rhythm (no client cache: a trainer's rollouts are new every step) and pushes the
weights with each tensor rescaled a little (a stand-in for an optimiser step, new version
`step-N`). After --stall-after steps the pushes stop while scoring goes on (a
trainer whose weight sync broke). Then it reads the series back through Prometheus's range
API, prints the alerts' states and writes the PNG. No trainer is involved: the ids are the
demo texts, the weight change is noise, so the credit values are those of a fixed text set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LATENCY = "rate(anchorcredit_request_duration_seconds_bucket{method='Score'}[20s])"
P99 = f"histogram_quantile(0.99, sum by (le) ({LATENCY}))"
PANELS = (  # (title, PromQL, unit)
    (
        "gamma_t mean",
        "sum(rate(anchorcredit_credit_gamma_sum[20s]))"
        " / sum(rate(anchorcredit_credit_gamma_count[20s]))",
        "",
    ),
    (
        "share of response tokens",
        "sum by (kind) (rate(anchorcredit_credit_token_fraction_sum[20s]))"
        " / sum by (kind) (rate(anchorcredit_credit_token_fraction_count[20s]))",
        "",
    ),
    ("seconds since the weights changed", "anchorcredit_policy_seconds_since_change", "s"),
    ("versions scored in the last minute", "anchorcredit_policy_versions_scored_recent", ""),
    ("Score latency p50 / p99", f"histogram_quantile(0.5, sum by (le) ({LATENCY}))", "s"),
    ("tokens scored per second", "sum(rate(anchorcredit_tokens_total[20s]))", ""),
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(model: Path, admin: str) -> tuple[subprocess.Popen, int, int]:
    cli = "import sys; from anchorcredit.cli import main; sys.exit(main())"
    args = [sys.executable, "-c", cli, "serve", "--model", str(model), "--device", "cpu"]
    args += ["--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1"]
    args += ["--metrics-port", "0"]
    proc = subprocess.Popen(
        args,
        env={**os.environ, "ANCHORCREDIT_ADMIN_TOKEN": admin, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ports, lines = None, []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if m := re.search(r"gRPC on 127\.0\.0\.1:(\d+) .* metrics on 127\.0\.0\.1:(\d+)", line):
            ports = int(m.group(1)), int(m.group(2))
        if "loaded in" in line:
            break
    if ports is None or proc.poll() is not None:
        raise SystemExit("anchorcredit serve did not start:\n" + "".join(lines))
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, ports[0], ports[1]


def _start_prometheus(tmp: Path, target: str) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("prometheus")
    if exe is None:
        raise SystemExit("prometheus is not installed (apt-get install -y prometheus)")
    config = tmp / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ROOT / "deploy" / "monitoring" / "alerts.rules.yaml")],
                "scrape_configs": [
                    {"job_name": "anchorcredit", "static_configs": [{"targets": [target]}]}
                ],
            }
        )
    )
    port = _free_port()
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/-/ready", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.2)
    raise SystemExit("Prometheus did not become ready")


def _api(url: str, path: str, **params: Any) -> Any:
    q = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{q}", timeout=30) as resp:
        return json.load(resp)["data"]


def _batches(model_dir: Path) -> list[tuple[list[int], list[int]]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(line) for line in (ROOT / "examples" / "demo.jsonl").open()]
    return [
        (tok(r["prompt"])["input_ids"], tok(r["response"])["input_ids"])
        for r in rows
        if r.get("response")
    ]


def _weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _play_trainer(client: Any, pairs: list, weights: dict, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    for step in range(1, args.steps + 1):
        order = rng.permutation(len(pairs))
        batch = [pairs[i] for i in order[: args.batch]]
        client.score([p for p, _ in batch], [r for _, r in batch], strategy="coupled_rhythm")
        if step <= args.stall_after:
            for w in weights.values():  # a stand-in for an optimiser step: each tensor
                if w.dtype.kind == "f":  # scaled by its own 1 + noise x N(0, 1)
                    w *= w.dtype.type(1.0 + args.noise * rng.standard_normal())
            client.push_weights(weights, version=f"step-{step}")
        print(f"step {step}/{args.steps}" + ("" if step <= args.stall_after else " (no push)"))
        time.sleep(args.step_s)


def _plot(url: str, start: float, end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(12, 9), sharex=True)
    for ax, (title, expr, unit) in zip(axes.flat, PANELS, strict=True):
        exprs = [expr, P99] if title.startswith("Score latency") else [expr]
        for e in exprs:
            for series in _api(url, "query_range", query=e, start=start, end=end, step=1)["result"]:
                t = np.array([float(v[0]) - start for v in series["values"]])
                y = np.array([float(v[1]) for v in series["values"]])
                label = series["metric"].get("kind")
                if title.startswith("Score latency"):
                    label = "p99" if e is P99 else "p50"
                ax.plot(t, y, label=label)
        ax.set_title(title + (f" ({unit})" if unit else ""))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("seconds into the run")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--stall-after", type=int, default=25, help="stop pushing after this step")
    ap.add_argument("--batch", type=int, default=6, help="responses scored per step")
    ap.add_argument("--step-s", type=float, default=2.0, help="idle seconds per step (rollout)")
    ap.add_argument("--noise", type=float, default=1e-2, help="per-tensor scale change (std)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "observability_run.png")
    args = ap.parse_args(argv)

    from anchorcredit.client import CreditClient

    if args.model:
        model_dir = Path(args.model)
    else:
        from anchorcredit.models.packaged import embedded_default_path

        model_dir = embedded_default_path()
    admin = "bench-admin"
    server, port, metrics_port = _start_server(model_dir, admin)
    tmp = Path(tempfile.mkdtemp(prefix="anchorcredit-observe-"))
    prom, url = _start_prometheus(tmp, f"127.0.0.1:{metrics_port}")
    try:
        # no client cache: a trainer's rollouts are new every step
        client = CreditClient([f"127.0.0.1:{port}"], cache=False, admin_token=admin)
        pairs, weights = _batches(model_dir), _weights(model_dir)
        time.sleep(3)
        start = time.time()
        _play_trainer(client, pairs, weights, args)
        time.sleep(3)
        end = time.time()
        for group in _api(url, "rules")["groups"]:
            for rule in group["rules"]:
                print(f"alert {rule['name']}: {rule['state']} (health {rule['health']})")
        _plot(url, start, end, args.out)
        client.close()
    finally:
        prom.terminate()
        server.terminate()
        server.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
