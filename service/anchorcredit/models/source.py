"""Where a model named on the command line comes from, decided before anything heavy loads.

anchorcredit never downloads a model: `--model` (and `--tokenizer`) name a local folder, or a
Hugging Face id already in the local Hugging Face cache (`HF_HOME`, filled by
`huggingface-cli download` or any earlier `from_pretrained`). Anything else fails at once
with one line saying how to fix it, instead of a minute of retries against an unreachable
Hub (torch-free: the CLI answers before importing torch).
"""

from __future__ import annotations

from pathlib import Path


class ModelNotFound(FileNotFoundError, ValueError):
    """A model or tokenizer name that is neither a local folder nor in the local HF cache
    (a FileNotFoundError for code that loads, a ValueError for code that validates input)."""


def local_model_dir(name: str | Path, flag: str = "--model") -> Path:
    """The local folder behind `name`: the folder itself, or the cached snapshot of a Hugging
    Face id (no network). ModelNotFound names the flag, the name and the ways out."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFound(f"{flag} {name}: not a folder (give the model's folder)")
    cached = _cached_snapshot(str(name))
    if cached is not None:
        return cached
    looks_like_id = str(name).count("/") == 1 and not str(name).startswith((".", "/", "~"))
    fetch = (
        f"fetch it once where the Hub is reachable (`huggingface-cli download {name} "
        f"--local-dir DIR`) and pass {flag} DIR"
        if looks_like_id
        else f"pass {flag} with the folder holding config.json and the weights"
    )
    raise ModelNotFound(
        f"{flag} {name}: no such folder, and not in the local Hugging Face cache "
        f"(anchorcredit never downloads models): {fetch}; or leave {flag} out to use the "
        "embedded SmolLM2-135M-Instruct"
    )


def _cached_snapshot(repo_id: str) -> Path | None:
    """The newest cached snapshot of `repo_id` in the local HF cache, or None (no network)."""
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        return None
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # the light install has no huggingface_hub: nothing is cached
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):  # not cached, or not an id
        return None
