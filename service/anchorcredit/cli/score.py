"""`anchorcredit score`: per-token WAAD, FAI, gamma (and entropy) for a JSONL file.

Input: one JSON object per line, either token ids or text (ids win when both are given):
    {"id": "q1", "prompt_ids": [...], "response_ids": [...]}
    {"id": "q2", "prompt": "...", "response": "..."}
Text is tokenised with the model's tokenizer (the prompt with the tokenizer's special
tokens, e.g. BOS; the response without), each part on its own. `id` is optional (default:
the 1-based line number) and must be unique; other scalar fields travel along in `meta`.

Output: one JSON object per scored line, appended and flushed batch by batch:
    {"id", "prompt_len", "response_len", "response_ids", "tokens" (text of each response
     token, when a tokenizer is known), "waad", "fai", "gamma", ["entropy"], "strategy",
     "params", "model", "policy_version", "local_heads", "global_heads", "prompt", "meta"}
Re-running with the same -o resumes: ids already in the output are skipped (a line cut
short by a crash is dropped first). Malformed input lines are reported with their line
number before any scoring starts (exit code 2), unless --skip-bad.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HELP = "score a JSONL file of (prompt, response) pairs: per-token WAAD, FAI, gamma (+entropy)"

STRATEGIES = ("uniform", "local_chunk", "global_anchor", "coupled_rhythm", "random", "entropy")
# Fields the output carries by itself; everything else scalar goes into `meta`.
_RESERVED = {"id", "prompt", "response", "prompt_ids", "response_ids"}
_MAX_REPORTED = 10  # bad lines listed before "... and N more"


class InputLineError(ValueError):
    """A malformed input line; the message starts with FILE:LINE."""


class RemoteInputError(ValueError):
    """The server refused a sequence (INVALID_ARGUMENT); `index` is its place in the batch."""

    def __init__(self, message: str, index: int | None):
        super().__init__(message)
        self.index = index


class RemoteServiceError(RuntimeError):
    """The server could not be used (unavailable, deadline, ...): not the input's fault."""


@dataclass
class Item:
    """One input line, parsed and tokenised."""

    line: int
    id: Any
    prompt_ids: list[int]
    response_ids: list[int]
    prompt_text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def _h_hi(v: str) -> int | str:
    if v.lower() in ("end", "none"):
        return "end"
    try:
        return int(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--h-hi must be an int or 'end', got {v!r}") from e


def _layers(v: str) -> list[int]:
    try:
        return [int(x) for x in v.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated ints: {v!r}") from e


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `anchorcredit score` (SPEC.md parameters keep their SPEC names)."""
    p.add_argument("input", type=Path, help="JSONL with prompt_ids/response_ids or prompt/response")
    p.add_argument("-o", "--output", type=Path, required=True, help="JSONL to append results to")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)",
    )
    src.add_argument("--target", default=None, help="score on a running server, host:port")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder for text input and token text (default: the model's)",
    )
    p.add_argument("--strategy", default="coupled_rhythm", choices=STRATEGIES)
    p.add_argument("--entropy", action="store_true", help="also write next-token entropy")
    g = p.add_argument_group("SPEC.md parameters (defaults = the SPEC's)")
    g.add_argument("--q", type=float, default=None, help="TopQ fraction (0.4)")
    g.add_argument("--gamma-amp", type=float, default=None, help="amplification (1.5)")
    g.add_argument("--alpha", type=float, default=None, help="coupled split (0.5)")
    g.add_argument("--k", type=int, default=None, help="look-back for intro tokens (3)")
    g.add_argument("--tau-waad", type=float, default=None, help="(median of WAAD)")
    g.add_argument("--tau-delta", type=float, default=None, help="(median of Delta)")
    g.add_argument("--seed", type=int, default=None, help="random strategy seed (0)")
    g.add_argument("--window", type=int, default=None, help="WAAD window W (10)")
    g.add_argument("--h-lo", type=int, default=None, help="FAI horizon start (10)")
    g.add_argument("--h-hi", type=_h_hi, default=None, help="FAI horizon end, int or 'end' (100)")
    g.add_argument("--head-quantile", type=float, default=None, help="head class share (0.3)")
    g.add_argument("--layers", type=_layers, default=None, help="e.g. 12,15,18 (middle third)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="float32")
    r.add_argument(
        "--max-batch-tokens",
        type=int,
        default=16384,
        help="tokens per model batch; results are flushed after each",
    )
    r.add_argument("--skip-bad", action="store_true", help="report bad lines and score the rest")
    r.add_argument("--quiet", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------- input


def _ids(v: Any, name: str) -> list[int]:
    if not isinstance(v, list) or not v:
        raise ValueError(f"{name} must be a non-empty list of token ids")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise ValueError(f"{name} must hold non-negative integers")
    return v


def parse_line(text: str, line: int, tokenizer: Any) -> Item:
    """One input line -> Item; ValueError (without the line prefix) when malformed."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", line)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise ValueError(f"id must be a string or an integer, got {rid!r}")
    prompt_text = obj.get("prompt")
    if prompt_text is not None and not isinstance(prompt_text, str):
        raise ValueError("prompt must be a string")
    if "prompt_ids" in obj or "response_ids" in obj:
        p = _ids(obj.get("prompt_ids"), "prompt_ids")
        r = _ids(obj.get("response_ids"), "response_ids")
    elif "prompt" in obj or "response" in obj:
        resp = obj.get("response")
        if not isinstance(prompt_text, str) or not isinstance(resp, str):
            raise ValueError("prompt and response must both be strings")
        if tokenizer is None:
            raise ValueError(
                "text input needs a tokenizer: pass --tokenizer PATH (or give prompt_ids/"
                "response_ids)"
            )
        p = list(tokenizer(prompt_text, add_special_tokens=True)["input_ids"])
        r = list(tokenizer(resp, add_special_tokens=False)["input_ids"])
        if not p or not r:
            raise ValueError("prompt and response must each tokenise to at least one token")
    else:
        raise ValueError("needs prompt_ids + response_ids, or prompt + response (text)")
    meta = {
        k: v
        for k, v in obj.items()
        if k not in _RESERVED and (isinstance(v, (str, int, float, bool)) or v is None)
    }
    return Item(line, rid, p, r, prompt_text, meta)


def read_input(path: Path, tokenizer: Any, skip_bad: bool) -> tuple[list[Item], list[str]]:
    """All items of the input file, and the error messages (FILE:LINE: ...) of bad lines."""
    items: list[Item] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        for n, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                item = parse_line(text, n, tokenizer)
                key = str(item.id)
                if key in seen:
                    raise ValueError(
                        f"duplicate id {item.id!r} (first on line {seen[key]}); ids must be "
                        "unique so that resuming can skip finished lines"
                    )
                seen[key] = n
                items.append(item)
            except ValueError as e:
                errors.append(f"{path}:{n}: {e}")
    if errors and not skip_bad:
        shown = errors[:_MAX_REPORTED]
        more = len(errors) - len(shown)
        raise InputLineError(
            "\n".join(shown + ([f"... and {more} more bad lines"] if more else []))
        )
    return items, errors


def done_ids(path: Path) -> set[str]:
    """Ids already in the output; a trailing partial line (a crash mid-write) is cut off."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    ids: set[str] = set()
    good_end = 0
    pos = 0
    for lineno, chunk in enumerate(raw.splitlines(keepends=True), start=1):
        end = pos + len(chunk)
        complete = chunk.endswith(b"\n")
        try:
            obj = json.loads(chunk)
            ok = isinstance(obj, dict) and "id" in obj
        except ValueError:
            ok = False
        if ok and (complete or end == len(raw)):
            ids.add(str(obj["id"]))
            good_end = end
        elif chunk.strip() and end == len(raw):
            pass  # a cut-off last line: dropped below
        elif chunk.strip():
            raise InputLineError(
                f"{path}: line {lineno} of the existing output is not a "
                "scored record; fix or move the file before resuming"
            )
        else:
            good_end = end
        pos = end
    if good_end < len(raw):
        print(f"anchorcredit: dropping a cut-off last line of {path}", file=sys.stderr)
        with path.open("r+b") as fh:
            fh.truncate(good_end)
    if good_end and not raw[:good_end].endswith(b"\n"):
        with path.open("ab") as fh:  # a complete last record without its newline
            fh.write(b"\n")
    return ids


# ----------------------------------------------------------------------------- output


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Text of each token such that the pieces join to the decoded text.

    Byte-level BPE splits some characters over several tokens: such a token gets '' and the
    token completing the character carries it (the streaming-detokeniser rule).
    """
    pieces: list[str] = []
    prefix, read = 0, 0
    for i in range(len(ids)):
        before = tokenizer.decode(ids[prefix:read]) if read > prefix else ""
        now = tokenizer.decode(ids[prefix : i + 1])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            pieces.append(now[len(before) :])
            prefix, read = read, i + 1
        else:
            pieces.append("")
    return pieces


def _floats(a: Any) -> list[float]:
    # 7 significant digits: what float32 holds, without float64 repr noise.
    return [float(f"{float(x):.7g}") for x in a]


def make_record(
    item: Item,
    res: Any,
    tokenizer: Any,
    strategy: str,
    params: dict[str, Any],
    model: str,
    with_entropy: bool,
) -> dict[str, Any]:
    """The output JSON object of one scored item."""
    rec: dict[str, Any] = {
        "id": item.id,
        "prompt_len": len(item.prompt_ids),
        "response_len": len(item.response_ids),
        "response_ids": item.response_ids,
    }
    if tokenizer is not None:
        rec["tokens"] = token_pieces(tokenizer, item.response_ids)
    rec["waad"] = _floats(res.waad)
    rec["fai"] = _floats(res.fai)
    rec["gamma"] = _floats(res.gamma)
    ent = getattr(res, "entropy", None)
    if with_entropy and ent is not None:
        rec["entropy"] = _floats(ent)
    rec["strategy"] = strategy
    rec["params"] = params
    rec["model"] = model
    rec["policy_version"] = getattr(res, "policy_version", None)
    for k in ("local_heads", "global_heads"):
        heads = getattr(res, k, None)
        if heads is not None:
            rec[k] = [list(map(int, h)) for h in heads]
    prompt = item.prompt_text
    if prompt is None and tokenizer is not None:
        prompt = tokenizer.decode(item.prompt_ids)
    if prompt is not None:
        rec["prompt"] = prompt
    if item.meta:
        rec["meta"] = item.meta
    return rec


def batches(items: list[Item], max_tokens: int) -> Iterator[list[Item]]:
    """In-order groups of at most max_tokens tokens (a longer item goes alone)."""
    cur: list[Item] = []
    tok = 0
    for it in items:
        if cur and tok + it.n_tokens > max_tokens:
            yield cur
            cur, tok = [], 0
        cur.append(it)
        tok += it.n_tokens
    if cur:
        yield cur


# ----------------------------------------------------------------------------- backends


def spec_params(args: argparse.Namespace) -> dict[str, Any]:
    """The SPEC parameters given on the command line (others keep the backend's defaults)."""
    names = ("q", "gamma_amp", "alpha", "k", "tau_waad", "tau_delta", "seed", "window", "h_lo")
    out = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.h_hi is not None:
        out["h_hi"] = args.h_hi
    if args.head_quantile is not None:
        out["head_quantile"] = args.head_quantile
    return out


class LocalBackend:
    """Scores in-process with anchorcredit.runner.Scorer."""

    def __init__(self, args: argparse.Namespace):
        from anchorcredit.runner import Scorer

        if args.quiet:  # transformers' own "Loading weights" bar too
            import transformers

            transformers.utils.logging.disable_progress_bar()
        self.scorer = Scorer.from_pretrained(
            args.model,
            device=args.device,
            dtype=args.dtype,
            layers=args.layers,
            max_batch_tokens=args.max_batch_tokens,
        )
        self.model = self.scorer.model_id or (args.model or "")

    def score(self, items: list[Item], strategy: str, params: dict, with_entropy: bool):
        kw = dict(params)
        if kw.get("h_hi") == "end":
            kw["h_hi"] = None  # the runner's spelling of "to the end of the response"
        pairs = [(it.prompt_ids, it.response_ids) for it in items]
        return self.scorer.score(pairs, strategy=strategy, with_entropy=with_entropy, **kw)


class RemoteBackend:
    """Scores on a running server through anchorcredit.client.CreditClient."""

    def __init__(self, args: argparse.Namespace):
        try:
            from anchorcredit.client import CreditClient
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError(f"--target needs the client package: {e}") from e
        if args.layers is not None:
            raise ValueError("--layers is the server's setting; it cannot be set with --target")
        self.client = CreditClient([args.target], cache=False)
        self.model = args.target
        try:
            self.model = str(self.client.model_info().model_id or args.target)
        except Exception:  # metadata only: scoring reports real errors
            pass

    def score(self, items: list[Item], strategy: str, params: dict, with_entropy: bool):
        import grpc

        from anchorcredit.client import CreditServiceError

        try:
            return self.client.score(
                [it.prompt_ids for it in items],
                [it.response_ids for it in items],
                strategy=strategy,
                with_entropy=with_entropy,
                **params,
            )
        except CreditServiceError as e:
            if e.code == grpc.StatusCode.INVALID_ARGUMENT:
                # e.index is the index in `items` (the client maps the server's back)
                raise RemoteInputError(e.details, e.index) from None
            raise RemoteServiceError(str(e)) from None


def _load_tokenizer(args: argparse.Namespace) -> Any:
    """The tokenizer for text input / token text, or None when there is none to be had."""
    from anchorcredit.offline.models import embedded_default_path, load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    if args.target:
        return None
    path = args.model or embedded_default_path()
    try:
        return load_tokenizer(path)
    except ValueError:  # e.g. the debug model: ids only
        return None


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    """Score the input file into the output file; 0 on success, 2 on bad input."""
    if not args.input.is_file():
        print(f"anchorcredit score: input not found: {args.input}", file=sys.stderr)
        return 2
    from anchorcredit.offline.models import EmbeddedModelUnavailable

    with_entropy = bool(args.entropy) or args.strategy == "entropy"
    try:
        tokenizer = _load_tokenizer(args)
        items, bad = read_input(args.input, tokenizer, args.skip_bad)
        done = done_ids(args.output)
    except (InputLineError, ValueError, EmbeddedModelUnavailable) as e:
        print(f"anchorcredit score: {e}", file=sys.stderr)
        return 2
    for msg in bad:
        print(f"anchorcredit score: skipped {msg}", file=sys.stderr)
    todo = [it for it in items if str(it.id) not in done]
    if len(todo) < len(items):
        print(
            f"anchorcredit score: resuming, {len(items) - len(todo)} of {len(items)} lines "
            f"already in {args.output}",
            file=sys.stderr,
        )
    if not todo:
        return 0

    params = spec_params(args)
    try:
        backend = RemoteBackend(args) if args.target else LocalBackend(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"anchorcredit score: {e}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    total = sum(it.n_tokens for it in todo)
    bar = tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc="scoring",
        file=sys.stderr,
        disable=args.quiet,
        mininterval=1.0,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_done = 0
    with args.output.open("a", encoding="utf-8") as out:
        for group in batches(todo, args.max_batch_tokens):
            try:
                results = backend.score(group, args.strategy, params, with_entropy)
            except ValueError as e:  # InputError and friends: name the input line
                idx = getattr(e, "index", None)
                where = f"{args.input}:{group[idx].line}: " if idx is not None else ""
                bar.close()
                print(
                    f"anchorcredit score: {where}{e}\n({n_done} lines written to "
                    f"{args.output} are kept; fix the line and re-run to resume)",
                    file=sys.stderr,
                )
                return 2
            except RemoteServiceError as e:
                bar.close()
                print(
                    f"anchorcredit score: {e}\n({n_done} lines written to {args.output} are "
                    "kept; re-run to resume)",
                    file=sys.stderr,
                )
                return 1
            for it, res in zip(group, results, strict=True):
                rec = make_record(
                    it, res, tokenizer, args.strategy, params, backend.model, with_entropy
                )
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()  # a crash later loses at most the batch in flight
            n_done += len(group)
            bar.update(sum(it.n_tokens for it in group))
    bar.close()
    dt = time.perf_counter() - t0
    rate = total / dt if dt > 0 else math.inf
    print(
        f"anchorcredit score: {n_done} lines, {total} tokens in {dt:.1f} s ({rate:.0f} tok/s) "
        f"-> {args.output}",
        file=sys.stderr,
    )
    return 0
