"""Regenerate the committed gRPC stubs (service/anchorcredit/v1/) from proto/.

With the pinned grpcio-tools:

    python scripts/gen_proto.py            # write stubs
    python scripts/gen_proto.py --check    # exit 1 if the committed stubs are stale

Compiled with -Iproto, so the stubs import `anchorcredit.v1.credit_pb2` and need no patching.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
STUB_DIR = ROOT / "service" / "anchorcredit" / "v1"
PINNED_GRPCIO_TOOLS = "1.85.1"
STUBS = ("credit_pb2.py", "credit_pb2.pyi", "credit_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    version = getattr(grpc_tools, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("grpcio-tools")
    if version != PINNED_GRPCIO_TOOLS:
        sys.exit(f"grpcio-tools=={PINNED_GRPCIO_TOOLS} is pinned; found {version}")
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="diff instead of writing")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "anchorcredit" / "v1"
        stale = [
            n
            for n in STUBS
            if not (STUB_DIR / n).exists() or not filecmp.cmp(fresh / n, STUB_DIR / n, False)
        ]
        if check:
            if stale:
                print(f"stale stubs: {stale}; run python scripts/gen_proto.py", file=sys.stderr)
                return 1
            return 0
        for name in STUBS:
            (STUB_DIR / name).write_bytes((fresh / name).read_bytes())
    print(f"wrote {', '.join(STUBS)} to {STUB_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
