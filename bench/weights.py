"""Weight sync to the service: disk (save_pretrained + UpdateWeights) vs gRPC stream vs collective.

    python bench/weights.py [--device all|cpu|cuda] [--repeats 3] [--model DIR | --preset NAME]
                            [--server process|thread]
    python bench/weights.py --stages [--repeats 3] [--model DIR]   # where a push's seconds go

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

`--stages` profiles one gRPC push stage by stage against a real `anchorcredit serve`
process on the CPU, for a float32 trainer pushing to a float32 server and to a bfloat16
server (the default dtype "auto" sends bfloat16 there), and prints per stage the median
seconds and share of the push: gather (full_state_items), encode (cast + bytes + messages,
timed alone: in a push it overlaps the stream), the stream on the wire and the server's
staging of it, finish, digest, commit (from the server's log line of each change), the
acknowledgement, and the per-step extras around a push: the version check that used to
follow it (a GetModelInfo per address; now it rides on the push's answer) and the pin (the
first score's GetModelInfo after a change).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inproc_server import start_server_thread  # bench/inproc_server.py (the script's folder)
from runner import PRESETS  # bench/runner.py's model shapes


def _start_process(model_dir: Path, device: str, dtype: str, log_path: Path | None = None):
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
    log = open(log_path, "w") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=log
    )
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


_STAGES = re.compile(
    r"receive (?P<receive>[\d.]+) s \(staging (?P<staging>[\d.]+) s\), "
    r"finish (?P<finish>[\d.]+) s, digest (?P<digest>[\d.]+) s, commit (?P<commit>[\d.]+) s"
)


def _server_stages(log_path: Path, version: str) -> dict[str, float]:
    """The server's stage seconds of the change to `version` (its INFO log line)."""
    for _ in range(100):
        for line in log_path.read_text(errors="replace").splitlines():
            if f"version '{version}'" in line and "stages:" in line:
                m = _STAGES.search(line)
                if m:
                    return {k: float(v) for k, v in m.groupdict().items()}
        time.sleep(0.05)  # the line is flushed just after the answer
    raise RuntimeError(f"no stage line for {version} in the server log")


def _profile(model_dir: Path, served: str, repeats: int) -> None:
    """One float32 trainer pushing to a `served`-dtype server process, stage by stage."""
    import torch
    from transformers import AutoModelForCausalLM

    from anchorcredit.client import CreditClient, push
    from anchorcredit.client.weights import (
        auto_wire_dtypes,
        full_state_items,
        prepare_weights,
        weight_chunks,
    )
    from anchorcredit.v1 import credit_pb2 as pb

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "serve.log"
        target, stop = _start_process(model_dir, "cpu", served, log_path)
        rows: list[dict[str, float]] = []
        try:
            with CreditClient(target, cache=False, timeout_s=600) as client:
                for i in range(repeats + 1):  # the first is a warm-up
                    with torch.no_grad():
                        for p in model.parameters():
                            p.add_(torch.randn_like(p), alpha=1e-4)
                    v = f"s{i}"
                    row: dict[str, float] = {}
                    t0 = time.perf_counter()
                    items = list(full_state_items(model))
                    row["gather"] = time.perf_counter() - t0
                    wire = auto_wire_dtypes(prepare_weights(items, "float32"), served)
                    t0 = time.perf_counter()
                    nbytes = sum(len(m.data) for m in weight_chunks(wire, pb.WeightUpdate()))
                    row["encode"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    client.push_weights(items, v)  # dtype "auto": what the server serves
                    row["push"] = time.perf_counter() - t0
                    server = _server_stages(log_path, v)
                    row["staging"] = server["staging"]
                    row["stream"] = server["receive"] - server["staging"]
                    for k in ("finish", "digest", "commit"):
                        row[k] = server[k]
                    row["ack"] = (
                        row["push"]
                        - server["receive"]
                        - sum(server[k] for k in ("finish", "digest", "commit"))
                    )
                    t0 = time.perf_counter()
                    push.check_serving(client.transport, [target], v, "bench")
                    row["version check"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    client.model_info(refresh=True)
                    row["pin"] = time.perf_counter() - t0
                    if i:
                        rows.append(row)
        finally:
            stop()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    step = med["gather"] + med["push"] + med["pin"]
    print(
        f"\ncpu: {model_dir.name}, float32 trainer -> {served} server (wire {served}, "
        f"{nbytes / 1e6:.0f} MB), {repeats} pushes (median), server in its own process\n"
    )
    print("| stage | where | s | share of gather + push + pin |")
    print("|---|---|---:|---:|")
    where = {
        "gather": "trainer: full_state_items",
        "encode": "trainer: cast, bytes, messages (overlaps the stream)",
        "stream": "wire: first byte to last, less staging",
        "staging": "server: checks, bytes -> staged tensors",
        "finish": "server: every tensor arrived",
        "digest": "server: weights digest (worker thread)",
        "commit": "server: staged -> live (device thread)",
        "ack": "answer back to the trainer",
        "version check": "removed: rides on the answer now",
        "pin": "first score's GetModelInfo",
    }
    for k, label in where.items():
        share = "" if k in ("encode", "version check") else f"{med[k] / step:.0%}"
        print(f"| {k} | {label} | {med[k]:.3f} | {share} |")
    total = med["push"]
    print(f"| **push_weights** | the call, end to end | {total:.3f} | {total / step:.0%} |")


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
    ap.add_argument("--stages", action="store_true", help="the per-stage profile of a push")
    args = ap.parse_args()

    import torch

    if args.preset is not None:
        args.model = random_model_dir(args.preset)
    elif args.model is None:
        from anchorcredit.models.packaged import embedded_default_path

        args.model = embedded_default_path()
    if args.stages:
        for served in ("float32", "bfloat16"):
            _profile(args.model, served, args.repeats)
        return
    if args.device in ("all", "cpu"):
        _section(args.model, "cpu", "float32", args.repeats, args.server)
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            _section(args.model, "cuda", "bfloat16", args.repeats, args.server)
        else:
            print("\ncuda: skipped (no CUDA device here)")


if __name__ == "__main__":
    main()
