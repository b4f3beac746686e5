"""Weight sync to the service: disk (save_pretrained + UpdateWeights) vs gRPC stream vs collective.

    python bench/weights.py [--device all|cpu|cuda] [--repeats 3] [--model DIR | --preset NAME]
                            [--server process|thread]

Serves the embedded SmolLM2-135M-Instruct (or --model, or with --preset a random-initialised
Qwen3 of bench/runner.py's shapes, saved to a temporary folder: the GPU box has no packaged
model) from a CreditServer on loopback (its
own process by default, as trainer and service run in deployment; `--server thread` runs it
in this process, sharing the GIL with the trainer side), holds a trainer copy of the same
model, and for each repeat makes a new policy version by perturbing every weight, then
times one sync of it:

- disk: `model.save_pretrained(tmp)` + `client.update_weights(tmp, version)`;
- stream: `client.push_weights(weights, version)` (PushWeights, gRPC);
- collective: `client.push_weights(weights, version, transport="collective")` over the
  private group (gloo on the CPU, NCCL on CUDA), opened once before timing (its setup is
  printed separately).

Each sync returns only when the server serves the new version. Prints a Markdown table per
device: median seconds, MB/s of the weights in the serving dtype, and speed-up over disk.
`--device all` (default) runs the CPU section, then the CUDA one when a GPU is available
(a skip line otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inproc_server import start_server_thread  # bench/inproc_server.py (the script's folder)
from runner import PRESETS  # bench/runner.py's model shapes


def _start_process(model_dir: Path, device: str, dtype: str):
    """`anchorcredit serve` in its own process; (target, stop) once it serves."""
    import socket

    from anchorcredit.client import CreditClient

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = "import sys; from anchorcredit.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--metrics-port", "-1", "--device", device, "--dtype", dtype]
    # A loopback benchmark: weight changes without an admin token or a weights dir.
    args += ["--allow-unauthenticated-weights"]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    with CreditClient(target, cache=False, timeout_s=5, retries=0) as probe:
        while True:
            try:
                probe.model_info(refresh=True)
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError("the server process did not start") from None
                time.sleep(0.5)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()

    return target, stop


def _section(model_dir: Path, device: str, dtype: str, repeats: int, server: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from anchorcredit.client import CreditClient
    from anchorcredit.client.weights import full_state

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch_dtype).to(device)
    with full_state(model) as items:
        payload = sum(t.numel() * t.element_size() for _, t in items)
    mb = payload / 1e6
    start = _start_process if server == "process" else start_server_thread
    target, stop = start(model_dir, device, dtype)
    counter = iter(range(10**6))
    times: dict[str, list[float]] = {"disk": [], "stream": [], "collective": []}
    try:
        with (
            CreditClient(target, cache=False, timeout_s=600) as client,
            tempfile.TemporaryDirectory() as tmp,
        ):
            t0 = time.perf_counter()
            group = client.open_weight_group(timeout_s=120)
            setup = time.perf_counter() - t0

            def new_version() -> str:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn_like(p), alpha=1e-4)
                if device == "cuda":
                    torch.cuda.synchronize()
                return f"v{next(counter)}"

            def disk(v: str) -> None:
                model.save_pretrained(tmp, safe_serialization=True)
                client.update_weights(tmp, v)

            def stream(v: str) -> None:
                with full_state(model) as w:
                    client.push_weights(w, v, dtype=dtype)

            def collective(v: str) -> None:
                with full_state(model) as w:
                    client.push_weights(w, v, dtype=dtype, transport="collective")

            paths = {"disk": disk, "stream": stream, "collective": collective}
            for fn in paths.values():  # warm-up, each once
                fn(new_version())
            for _ in range(repeats):  # interleaved, so load on a shared box hits all alike
                for name, fn in paths.items():
                    v = new_version()
                    t0 = time.perf_counter()
                    fn(v)
                    times[name].append(time.perf_counter() - t0)
            served = client.model_info(refresh=True).policy_version
            assert served == v, (served, v)
    finally:
        stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\n{device}: {model_dir.name}, {dtype}, {mb:.1f} MB of weights, "
        f"{repeats} repeats (median), server in a {server}, "
        f"collective group {group.backend} set up in {setup:.2f} s\n"
    )
    print("| path | s / sync | MB/s | vs disk |")
    print("|---|---:|---:|---:|")
    labels = {
        "disk": "disk: save_pretrained + UpdateWeights(path)",
        "stream": "gRPC stream: PushWeights",
        "collective": f"collective: {group.backend} broadcast",
    }
    for name, s in med.items():
        print(f"| {labels[name]} | {s:.3f} | {mb / s:.0f} | {med['disk'] / s:.2f}x |")
    if device == "cuda":
        rate = mb / med["collective"]
        print(
            f"\ncuda: at {rate:.0f} MB/s a Qwen3-8B bf16 push (16.4 GB) would take "
            f"~{16.4e3 / rate:.1f} s"
        )


def random_model_dir(preset: str) -> Path:
    """A random-initialised Qwen3 with the preset's shapes, saved in bf16 to a temporary folder
    (removed at exit); weight sync timings depend on the bytes, not on the values."""
    import atexit
    import shutil

    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(**PRESETS[preset], tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialise where it is fast
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    folder = Path(tempfile.mkdtemp(prefix=f"anchorcredit-{preset}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="a random-initialised Qwen3 of these shapes, not --model")  # fmt: skip
    ap.add_argument("--server", choices=("process", "thread"), default="process")
    args = ap.parse_args()

    import torch

    if args.preset is not None:
        args.model = random_model_dir(args.preset)
    elif args.model is None:
        from anchorcredit.models.packaged import embedded_default_path

        args.model = embedded_default_path()
    if args.device in ("all", "cpu"):
        _section(args.model, "cpu", "float32", args.repeats, args.server)
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            _section(args.model, "cuda", "bfloat16", args.repeats, args.server)
        else:
            print("\ncuda: skipped (no CUDA device here)")


if __name__ == "__main__":
    main()
