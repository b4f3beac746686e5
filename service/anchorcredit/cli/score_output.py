"""`anchorcredit score`'s output: one record per scored line, and resuming an existing file.

Every record carries the settings it was computed with (`SETTINGS`): the strategy, every
SPEC.md parameter (defaults included, CreditParams.record()), with_entropy, the layers read,
the model id and revision, the policy version, the statistics version and the tokenizer
(its name or path; null when ids were scored without one). Resuming compares
them with the new run's and refuses to mix results of different settings.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anchorcredit.cli.score_input import InputLineError, Item

# The recorded settings, in output order; resuming compares each of them.
SETTINGS = (
    "strategy",
    "params",
    "with_entropy",
    "layers",
    "model",
    "revision",
    "policy_version",
    "stat_version",
    "tokenizer",
)
# How a setting is named in a "what differs" message (the flag that sets it, if any).
_LABELS = {"strategy": "--strategy", "with_entropy": "--entropy"}
_MISSING = object()  # a setting an older file did not record


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


def make_record(item: Item, res: Any, tokenizer: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """The output JSON object of one scored item; `settings` holds every key of SETTINGS."""
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
    if settings["with_entropy"] and ent is not None:
        rec["entropy"] = _floats(ent)
    rec.update({k: settings[k] for k in SETTINGS})
    version = getattr(res, "policy_version", None)
    if version is not None:  # the version that produced these numbers
        rec["policy_version"] = str(version)
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


@dataclass
class ExistingOutput:
    """What an output file already holds: the ids done and the distinct recorded settings."""

    ids: set[str] = field(default_factory=set)
    settings: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (line, ...)


def read_output(path: Path) -> ExistingOutput:
    """Ids and settings already in the output; a trailing partial line (a crash mid-write)
    is cut off. A bad line elsewhere raises InputLineError."""
    found = ExistingOutput()
    if not path.exists():
        return found
    raw = path.read_bytes()
    seen: set[str] = set()
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
            found.ids.add(str(obj["id"]))
            settings = {k: obj.get(k, _MISSING) for k in SETTINGS}
            key = repr(settings)
            if key not in seen:
                seen.add(key)
                found.settings.append((lineno, settings))
            good_end = end
        elif chunk.strip() and end == len(raw):
            pass  # a cut-off last line: dropped below
        elif chunk.strip():
            raise InputLineError(
                f"{path}: line {lineno} of the existing output is not a scored record; "
                "fix or move the file, or pass --overwrite to start over"
            )
        else:
            good_end = end
        pos = end
    if good_end < len(raw):
        print(f"anchorcredit score: dropping a cut-off last line of {path}", file=sys.stderr)
        with path.open("r+b") as fh:
            fh.truncate(good_end)
    if good_end and not raw[:good_end].endswith(b"\n"):
        with path.open("ab") as fh:  # a complete last record without its newline
            fh.write(b"\n")
    return found


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(not recorded)"
    return value if isinstance(value, str) else json.dumps(value)


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`name: old -> new` for every setting in `new` that `old` records differently (or not
    at all); the SPEC parameters are named by their flags (`--gamma-amp`)."""
    out: list[str] = []
    for key, value in new.items():
        before = old.get(key, _MISSING)
        if key == "params" and isinstance(before, dict):
            for name, v in value.items():
                b = before.get(name, _MISSING)
                if b is _MISSING or b != v:
                    out.append(f"--{name.replace('_', '-')}: {_show(b)} -> {_show(v)}")
        elif before is _MISSING or before != value:
            out.append(f"{_LABELS.get(key, key)}: {_show(before)} -> {_show(value)}")
    return out


def check_resume(path: Path, existing: ExistingOutput, new: dict[str, Any]) -> str | None:
    """None when every record of `existing` has the settings in `new`; else the message
    (what differs, and how to start over)."""
    for lineno, old in existing.settings:
        diff = settings_diff(old, new)
        if not diff:
            continue
        older = any(v is _MISSING for v in old.values())
        why = (
            "was written by an older anchorcredit that did not record its settings"
            if older
            else "holds results computed with other settings"
        )
        return (
            f"{path} {why} (line {lineno}); resuming would mix them with this run's:\n  "
            + "\n  ".join(diff)
            + f"\nPass --overwrite to start over (empties {path}), or write to another -o file."
        )
    return None
