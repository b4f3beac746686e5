"""`anchorcredit score`'s input: the tokenizer for text, and the JSONL lines parsed to Items.

One JSON object per line, token ids or text:
    {"id": "q1", "prompt_ids": [...], "response_ids": [...]}
    {"id": "q2", "prompt": "...", "response": "..."}
Text is tokenised with the model's tokenizer (the prompt with the tokenizer's special
tokens, e.g. BOS; the response without), each part on its own. A line with both ids and
text (e.g. a model's own generations) is checked: the ids must be this tokenizer's tokens
of the text (re-encoding the text gives the ids, or decoding the ids gives the text, special
tokens skipped or not); otherwise the line is refused (FILE:LINE) as ids from another
tokenizer, naming --prefer: `ids` scores the ids as given, `text` re-tokenises the text.
Without a tokenizer such lines use their ids (nothing to check against). `id` is optional (default:
the 1-based line number) and must be unique; other scalar fields travel along in `meta`.
Every bad line is reported as FILE:LINE: reason before any scoring starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fields the output carries by itself; everything else scalar goes into `meta`.
_RESERVED = {"id", "prompt", "response", "prompt_ids", "response_ids"}
_MAX_REPORTED = 10  # bad lines listed before "... and N more"
# Why text cannot be tokenised when no tokenizer is known (read_input's default).
NO_TOKENIZER = (
    "text input needs a tokenizer: pass --tokenizer PATH (or give prompt_ids/response_ids)"
)


class InputLineError(ValueError):
    """Malformed input lines (or an unusable output file); the message names FILE:LINE."""


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


def _ids(v: Any, name: str) -> list[int]:
    if not isinstance(v, list) or not v:
        raise ValueError(f"{name} must be a non-empty list of token ids")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise ValueError(f"{name} must hold non-negative integers")
    return v


def tokenizer_name(tokenizer: Any) -> str | None:
    """What an output records as its tokenizer: its name or path (None without one)."""
    if tokenizer is None:
        return None
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _encode(tokenizer: Any, text: str, prompt: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=prompt)["input_ids"])


def _ids_match_text(tokenizer: Any, ids: list[int], text: str, prompt: bool) -> bool:
    """True when `ids` are this tokenizer's tokens of `text` (either direction)."""
    if _encode(tokenizer, text, prompt) == ids:
        return True
    try:
        return any(
            tokenizer.decode(ids, skip_special_tokens=skip) == text for skip in (False, True)
        )
    except Exception:  # ids outside this vocabulary
        return False


def parse_line(
    text: str,
    line: int,
    tokenizer: Any,
    no_tokenizer: str = NO_TOKENIZER,
    prefer: str | None = None,
) -> Item:
    """One input line -> Item; ValueError (without the line prefix) when malformed.

    no_tokenizer: the message for a text line when `tokenizer` is None. prefer: for lines
    with both ids and text, "ids", "text", or None (check that they agree; module docstring).
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        # json's msg may end in "at" already ("Invalid control character at"): no doubled word
        raise ValueError(
            f"not valid JSON ({e.msg.removesuffix(' at')}, column {e.colno}); fix the line, "
            "or pass --skip-bad to score the other lines"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", line)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise ValueError(f"id must be a string or an integer, got {rid!r}")
    prompt_text = obj.get("prompt")
    if prompt_text is not None and not isinstance(prompt_text, str):
        raise ValueError("prompt must be a string")
    has_ids = "prompt_ids" in obj or "response_ids" in obj
    has_text = "prompt" in obj or "response" in obj
    if has_ids and not (has_text and prefer == "text"):
        p = _ids(obj.get("prompt_ids"), "prompt_ids")
        r = _ids(obj.get("response_ids"), "response_ids")
        resp = obj.get("response")
        if has_text and prefer is None and tokenizer is not None:
            if not isinstance(prompt_text, str) or not isinstance(resp, str):
                raise ValueError("prompt and response must both be strings")
            for name, ids, part, is_prompt in (
                ("prompt", p, prompt_text, True),
                ("response", r, resp, False),
            ):
                if not _ids_match_text(tokenizer, ids, part, is_prompt):
                    raise ValueError(
                        f"{name}_ids are not what the tokenizer {tokenizer_name(tokenizer)} "
                        f"makes of the {name} text (ids from another tokenizer?); pass "
                        "--prefer text to re-tokenise the text with this model's tokenizer, "
                        "or --prefer ids to score the ids as they are"
                    )
    elif has_text:
        resp = obj.get("response")
        if not isinstance(prompt_text, str) or not isinstance(resp, str):
            raise ValueError("prompt and response must both be strings")
        if tokenizer is None:
            raise ValueError(no_tokenizer)
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


def input_ids(path: Path) -> set[str] | None:
    """The ids of the input's lines (as resuming compares them), read without a tokenizer;
    None when a line is not a JSON object (read_input reports it properly)."""
    ids: set[str] = set()
    with path.open(encoding="utf-8") as fh:
        for n, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError:
                return None
            if not isinstance(obj, dict):
                return None
            ids.add(str(obj.get("id", n)))
    return ids


def read_input(
    path: Path,
    tokenizer: Any,
    skip_bad: bool,
    no_tokenizer: str = NO_TOKENIZER,
    prefer: str | None = None,
) -> tuple[list[Item], list[str]]:
    """All items of the input file, and the error messages (FILE:LINE: ...) of bad lines.

    Raises InputLineError listing the bad lines unless skip_bad. prefer: parse_line's.
    """
    items: list[Item] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        for n, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                item = parse_line(text, n, tokenizer, no_tokenizer, prefer)
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


def choose_tokenizer(
    tokenizer: str | None, model: str | None, served_model_id: str | None
) -> tuple[Any, str]:
    """(tokenizer or None, the message for text lines when it is None).

    --tokenizer wins. Locally (served_model_id None) the model's own tokenizer, else the
    embedded model's. With --target the embedded tokenizer when the server serves the
    embedded model; for any other model the message names the model to fetch it for.
    """
    from anchorcredit.cli import extras
    from anchorcredit.models.packaged import (
        EMBEDDED_MODEL_ID,
        EmbeddedModelUnavailable,
        embedded_default_path,
        load_tokenizer,
    )

    if extras.missing(["transformers"]):  # the light client: token ids work, text does not
        return None, (
            f"text input needs a tokenizer, and transformers is not installed "
            f"({extras.SERVICE}); or give prompt_ids/response_ids"
        )
    if tokenizer:
        return load_tokenizer(tokenizer), NO_TOKENIZER
    if served_model_id is not None:  # --target
        if served_model_id == EMBEDDED_MODEL_ID:
            try:
                return load_tokenizer(embedded_default_path()), NO_TOKENIZER
            except EmbeddedModelUnavailable as e:  # ids still work without it
                return None, (
                    f"text input needs --tokenizer PATH or the embedded tokenizer of "
                    f"{served_model_id} (what the server serves): {e}"
                )
        return None, (
            f"text input needs --tokenizer PATH: the server serves {served_model_id or '?'}; "
            "pass that model's folder (or give prompt_ids/response_ids)"
        )
    try:
        return load_tokenizer(model or embedded_default_path()), NO_TOKENIZER
    except ValueError:  # e.g. the debug model: ids only
        return None, (
            f"text input needs a tokenizer and {model} has none: pass --tokenizer PATH "
            "(or give prompt_ids/response_ids)"
        )
