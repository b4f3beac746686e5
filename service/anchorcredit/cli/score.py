"""`anchorcredit score`: per-token WAAD, FAI, gamma (and entropy) for a JSONL file.

This module holds the flags and the run; the input format lives in score_input.py, the
output records and the resume rules in score_output.py, the local and remote backends in
score_backends.py.

Output: one JSON object per scored line, appended and flushed group by group (at most
--max-batch-tokens tokens each); every line records the settings it was computed with.
Re-running with the same -o resumes: ids already in the output are skipped (a line cut
short by a crash is dropped first), provided the output holds the same settings; otherwise
the run refuses and says what differs (--overwrite starts over). Malformed input lines are
reported with their line number before any scoring starts (exit code 2), unless --skip-bad.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from anchorcredit import contract
from anchorcredit.budget import greedy_chunks
from anchorcredit.cli import extras
from anchorcredit.cli.interrupts import EXIT_CODE as INTERRUPTED
from anchorcredit.cli.interrupts import Interrupted, Interrupts
from anchorcredit.cli.score_backends import LocalBackend, RemoteBackend, RemoteServiceError
from anchorcredit.cli.score_input import choose_tokenizer, input_ids, read_input, tokenizer_name
from anchorcredit.cli.score_output import ExistingOutput, check_resume, make_record, read_output
from anchorcredit.contract import (
    DEFAULT_STRATEGY,
    DEFAULTS,
    STAT_VERSION,
    STRATEGIES,
    CreditParams,
)
from anchorcredit.errors import InputError
from anchorcredit.models.source import ModelNotFound, local_model_dir
from anchorcredit.server.config import DEFAULT_LIMITS

HELP = "score a JSONL file of (prompt, response) pairs: per-token WAAD, FAI, gamma (+entropy)"

# The SPEC.md parameters, as CreditParams names them (flags: --gamma-amp for gamma_amp).
SPEC_PARAMS = tuple(f.name for f in fields(CreditParams) if f.name != "strategy")
CPU_GROUP_TOKENS = 1024  # a few seconds of the embedded model on two CPU cores


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _arg_type(name: str) -> Any:
    """argparse type of a SPEC parameter: h_hi stays a string (an int or 'end', checked by
    the contract), the others follow the CreditParams annotation."""
    if name == "h_hi":
        return str
    annotation = str(next(f.type for f in fields(CreditParams) if f.name == name))
    return int if annotation.startswith("int") else float


def _layers(v: str) -> list[int]:
    try:
        return [int(x) for x in v.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"must be comma-separated ints, got {v!r}") from e


def _with_default(text: str, default: Any) -> str:
    return text if "default" in text else f"{text} (default: {default})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `anchorcredit score`; the SPEC.md parameters, their help and defaults come
    from anchorcredit.contract."""
    _add_files(p)
    _add_source(p)
    _add_credit(p)
    _add_runtime(p)


def _add_files(p: argparse.ArgumentParser) -> None:
    """What is read and where results go."""
    p.add_argument("input", type=Path, help="JSONL with prompt_ids/response_ids or prompt/response")
    p.add_argument(
        "-o", "--output", type=Path, required=True, help="JSONL to append (resume) results to"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="empty the output first and score every line (default: resume into it)",
    )


def _add_source(p: argparse.ArgumentParser) -> None:
    """Which model scores: a local folder, the embedded default, or a running server."""
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)",
    )
    src.add_argument(
        "--target", default=None, help="score on a running server, host:port (default: local)"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder for text input and token text (default: the model's; with "
        "--target the embedded model's when the server serves it)",
    )


def _add_credit(p: argparse.ArgumentParser) -> None:
    """The credit asked for: strategy, entropy, the SPEC.md parameters, layers, ids or text."""
    p.add_argument(
        "--strategy",
        default=DEFAULT_STRATEGY,
        choices=STRATEGIES,
        metavar="NAME",
        help=f"credit strategy: {', '.join(STRATEGIES)} (default: {DEFAULT_STRATEGY})",
    )
    p.add_argument(
        "--entropy",
        action="store_true",
        help="also write next-token entropy (default: off; on for --strategy entropy)",
    )
    g = p.add_argument_group("SPEC.md parameters")
    defaults = DEFAULTS.record()
    for name in SPEC_PARAMS:
        g.add_argument(
            _flag(name),
            dest=name,
            type=_arg_type(name),
            default=None,  # None: the contract's default (shown in the help)
            metavar=name.upper(),
            help=_with_default(contract.HELP[name], defaults[name]),
        )
    g.add_argument(
        "--layers",
        type=_layers,
        default=None,
        help="comma-separated layers whose attention is read, e.g. 12,15,18 (default: the "
        "middle third, SPEC.md 'Layers', moved to the nearest full-attention layers for "
        "hybrid models; with --target the server's)",
    )
    p.add_argument(
        "--prefer",
        choices=("ids", "text"),
        default=None,
        help="for lines with both token ids and text: 'ids' scores the ids as given, 'text' "
        "re-tokenises the text with the model's tokenizer (default: check that the ids are "
        "this tokenizer's tokens of the text and refuse the line when they are not)",
    )


def _add_runtime(p: argparse.ArgumentParser) -> None:
    """Device, dtype, batch size, bad lines, progress."""
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    r.add_argument(
        "--dtype",
        default="float32",
        help="model dtype: float32, bfloat16 or float16 (default: float32)",
    )
    r.add_argument(
        "--max-batch-tokens",
        type=int,
        default=DEFAULT_LIMITS.max_batch_tokens,
        help="tokens per model batch (the server's default budget); results are flushed "
        "after each "
        f"(default: {DEFAULT_LIMITS.max_batch_tokens})",
    )
    r.add_argument(
        "--skip-bad", action="store_true", help="report bad lines and score the rest (default: off)"
    )
    r.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")


def build_params(args: argparse.Namespace) -> CreditParams:
    """The validated parameters of this run; InputError names the field (params.q)."""
    given = {n: getattr(args, n) for n in SPEC_PARAMS if getattr(args, n) is not None}
    return CreditParams.build(args.strategy, **given)


def _flag_message(e: InputError) -> str:
    """`--q: must be in [0, 1], got 2` from the contract's `params.q: ...`."""
    where = e.field or ""
    message = str(e).removeprefix(f"{where}: ")
    name = where.removeprefix("params.")
    return f"{_flag(name)}: {message}" if name in SPEC_PARAMS or name == "strategy" else str(e)


def _say(message: str) -> None:
    print(f"anchorcredit score: {message}", file=sys.stderr)


def group_tokens(args: argparse.Namespace) -> int:
    """Tokens per group (scored, then written and flushed): --max-batch-tokens, but at most
    CPU_GROUP_TOKENS on a CPU, so an interrupt there loses seconds of work, not minutes.
    A pure function of the options: the same input is cut the same way on every run, so
    results (whose float rounding depends on their batch mates) are reproducible."""
    if args.target or not str(args.device).startswith("cpu"):
        return args.max_batch_tokens
    return min(args.max_batch_tokens, CPU_GROUP_TOKENS)


@dataclass
class _Progress:
    """What an interrupt leaves behind: the lines written so far."""

    output: Path
    done: int = 0
    todo: int = 0
    opened: bool = False
    bar: Any = None
    signals: Interrupts = field(default_factory=Interrupts)

    def interrupted(self, signum: int) -> str:
        if self.bar is not None:
            self.bar.close()
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if not self.opened:
            return f"{name}: stopped before the first group was written; {self.output} is unchanged"
        return (
            f"{name}: stopped; {self.done} lines are saved in {self.output} "
            f"({self.todo - self.done} not scored yet): re-run the same command to resume"
        )


def run(args: argparse.Namespace) -> int:
    """Score the input file into the output file; 0 on success, 2 on bad input or options,
    1 when a server cannot be used, 130 when interrupted (SIGINT/SIGTERM: every line
    written so far is complete and kept)."""
    progress = _Progress(args.output)
    with progress.signals:
        try:
            return _run(args, progress)
        except Interrupted as stop:
            _say(progress.interrupted(stop.signum))
            return INTERRUPTED


def _settings(args: argparse.Namespace, params: CreditParams) -> dict[str, Any]:
    """The settings the command line decides (every output record carries them)."""
    spec = params.record()
    return {
        "strategy": spec.pop("strategy"),
        "params": spec,
        "with_entropy": bool(args.entropy) or params.needs_entropy,
    }


def _check_options(args: argparse.Namespace) -> CreditParams | None:
    """The run's parameters, or None after saying what is wrong with the options."""
    try:
        params = build_params(args)
    except InputError as e:
        _say(_flag_message(e))
        return None
    if not args.input.is_file():
        _say(f"input not found: {args.input}")
        return None
    if args.target and args.layers is not None:
        _say("--layers is the server's setting; it cannot be set with --target")
        return None
    try:  # a local folder or the local Hugging Face cache, never a download
        if args.model:
            local_model_dir(args.model, "--model")
        if args.tokenizer:
            local_model_dir(args.tokenizer, "--tokenizer")
    except ModelNotFound as e:
        _say(str(e))
        return None
    return params


def _answer_early(
    args: argparse.Namespace, existing: ExistingOutput, settings: dict[str, Any]
) -> int | None:
    """Refusals and no-op re-runs, decided from the options and the files alone (no torch,
    no model): an exit code, or None to go on."""
    known = dict(settings)
    if not args.target:  # what the local model will record, known without loading it
        from anchorcredit.models.packaged import EMBEDDED_MODEL_ID

        known |= {
            "model": args.model or EMBEDDED_MODEL_ID,
            "policy_version": "0",
            "stat_version": STAT_VERSION,
        }
    refusal = check_resume(args.output, existing, known)
    if refusal is not None:
        _say(refusal)
        return 2
    ids = input_ids(args.input)
    if args.overwrite or ids is None or not ids or not ids <= existing.ids:
        return None
    if args.layers is not None or args.tokenizer:  # the model's settings decide: load it
        return None
    recorded = existing.settings[0][1]
    _say(
        f"nothing to do: all {len(ids)} lines of {args.input} are already in {args.output} "
        f"(model {recorded.get('model')}, layers {recorded.get('layers')}); pass "
        "--overwrite to score them again"
    )
    return 0


def _run(args: argparse.Namespace, progress: _Progress) -> int:
    from anchorcredit.models.packaged import EmbeddedModelUnavailable

    params = _check_options(args)
    if params is None:
        return 2
    settings = _settings(args, params)
    try:
        existing = ExistingOutput() if args.overwrite else read_output(args.output)
    except ValueError as e:
        _say(str(e))
        return 2
    early = _answer_early(args, existing, settings)
    if early is not None:
        return early
    if not args.target:  # a local model: torch and transformers (a server needs neither)
        problem = extras.needs("score", extras.MODEL, "without --target")
        if problem:
            print(problem, file=sys.stderr)
            return 2
    remote = None
    if args.target:
        try:
            remote = RemoteBackend(args.target)
        except RemoteServiceError as e:
            _say(f"{e}\n(nothing scored; {args.output} is unchanged; re-run to resume)")
            return 1
        except RuntimeError as e:
            _say(str(e))
            return 2
    try:
        tokenizer, no_tokenizer = choose_tokenizer(
            args.tokenizer, args.model, remote.model_id if remote else None
        )
        items, bad = read_input(
            args.input, tokenizer, args.skip_bad, no_tokenizer, getattr(args, "prefer", None)
        )
    except (ValueError, EmbeddedModelUnavailable) as e:
        _say(str(e))
        return 2
    for msg in bad:
        _say(f"skipped {msg}")
    backend = remote or _local_backend(args, settings["with_entropy"])
    if isinstance(backend, int):
        return backend
    settings |= backend.settings()
    settings["tokenizer"] = tokenizer_name(tokenizer)
    refusal = check_resume(args.output, existing, settings)  # what the model decides
    if refusal is not None:
        _say(refusal)
        return 2
    todo = [it for it in items if str(it.id) not in existing.ids]
    if len(todo) < len(items):
        _say(f"resuming, {len(items) - len(todo)} of {len(items)} lines already in {args.output}")
    if not todo and not args.overwrite:
        return 0
    progress.todo = len(todo)
    return _score_all(args, backend, params, settings, todo, tokenizer, progress)


def _local_backend(args: argparse.Namespace, with_entropy: bool) -> Any:
    """The in-process backend, or exit code 2 after saying why it cannot load."""
    from anchorcredit.runner.layers import LayerChoiceError

    try:
        return LocalBackend(args.model, args.device, args.dtype, args.layers, entropy=with_entropy)
    except LayerChoiceError as e:  # nothing written: the output is untouched
        _say(f"--layers: {e}")
    except (ValueError, OSError, RuntimeError) as e:
        _say(str(e))
    return 2


def _score_all(
    args: argparse.Namespace,
    backend: Any,
    params: CreditParams,
    settings: dict[str, Any],
    todo: list[Any],
    tokenizer: Any,
    progress: _Progress,
) -> int:
    """Score `todo` in groups (group_tokens), appending and flushing each group's records;
    a signal waits until the group being written is complete."""
    total = sum(it.n_tokens for it in todo)
    progress.bar = bar = _progress_bar(
        total=total,
        unit="tok",
        unit_scale=True,
        desc="scoring",
        file=sys.stderr,
        disable=args.quiet,
        mininterval=1.0,
    )
    t0 = time.perf_counter()
    groups = greedy_chunks([it.n_tokens for it in todo], group_tokens(args))
    # The output is opened (created, or emptied by --overwrite) only once the first group
    # has scored: a run that fails before that leaves the file as it was.
    if not groups and args.overwrite:
        args.output.write_text("", encoding="utf-8")  # --overwrite of an empty input
    with contextlib.ExitStack() as stack:
        out = None
        for idx in groups:
            group = [todo[i] for i in idx]
            try:
                results = backend.score(group, params, settings["with_entropy"])
            except Exception as e:  # one line, never a traceback
                bar.close()
                return _scoring_failed(args, e, group, progress)
            with progress.signals.deferred():
                if out is None:
                    args.output.parent.mkdir(parents=True, exist_ok=True)
                    mode = "w" if args.overwrite else "a"
                    out = stack.enter_context(args.output.open(mode, encoding="utf-8"))
                    progress.opened = True
                for it, res in zip(group, results, strict=True):
                    rec = make_record(it, res, tokenizer, settings)
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                out.flush()  # a crash later loses at most the group in flight
                progress.done += len(group)
            bar.update(sum(it.n_tokens for it in group))
    bar.close()
    dt = time.perf_counter() - t0
    rate = total / dt if dt > 0 else math.inf
    _say(f"{progress.done} lines, {total} tokens in {dt:.1f} s ({rate:.0f} tok/s) -> {args.output}")
    return 0


def _progress_bar(**kw: Any) -> Any:
    """tqdm's bar, or a silent stand-in where tqdm is not installed (the light client)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(**kw)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _scoring_failed(
    args: argparse.Namespace, e: Exception, group: list[Any], progress: _Progress
) -> int:
    """Say why a group failed, what was kept and what to do; the exit code."""
    kept = (
        f"{progress.done} lines written to {args.output} are kept"
        if progress.opened
        else f"nothing written; {args.output} is unchanged"
    )
    if isinstance(e, ValueError):  # InputError and friends: name the input line
        i = getattr(e, "index", None)
        if i is not None:
            _say(f"{args.input}:{group[i].line}: {e}\n({kept}; fix the line and re-run to resume)")
        else:  # not a line's fault (e.g. entropy asked of a server without it)
            _say(f"{e}\n({kept}; re-run to resume)")
        return 2
    if isinstance(e, RemoteServiceError):
        _say(f"{e}\n({kept}; re-run to resume)")
        return 1
    if isinstance(e, RuntimeError | NotImplementedError):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _say(f"scoring failed: {first}\n({kept})")
        return 1
    raise e
