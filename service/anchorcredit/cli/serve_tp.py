"""`anchorcredit serve --tensor-parallel N`: rank 0 serves gRPC, the other ranks follow.

Rank 0 runs the usual server (health, batcher, /metrics); its backend is a
TensorParallelScorer that drives every rank's share of each forward. The other ranks
either are spawned by rank 0 while it loads the model, or were started by torchrun
alongside it: those load their shard and run the worker loop until rank 0 stops, and
never bind a port. See docs/TENSOR_PARALLEL.md.

It lives in the CLI because it joins the two halves: the server (app, config) and the
runner's sharded scorer, which knows nothing about gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from anchorcredit.runner.layers import LayerChoiceError
from anchorcredit.runner.tensor_parallel import TensorParallelScorer, launch
from anchorcredit.runner.tp_launch import under_torchrun
from anchorcredit.server.app import resolve_device, resolve_dtype, serve
from anchorcredit.server.config import ServeConfig

log = logging.getLogger(__name__)


def serve_tensor_parallel(cfg: ServeConfig) -> int:
    """Serve with the model sharded over cfg.tensor_parallel ranks; the exit code."""
    device = resolve_device(cfg.device)
    kwargs = dict(
        device=device,
        dtype=resolve_dtype(cfg.dtype, device),
        layers=cfg.layer_list,
        policy_version=cfg.policy_version,
        entropy=cfg.entropy,
    )
    if under_torchrun() and int(os.environ["RANK"]) != 0:
        # torchrun passes SIGTERM / SIGINT to every rank at once: let rank 0 drain its
        # in-flight batches (which need every rank) and then tell this one to stop.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        launch(cfg.tensor_parallel, cfg.model, **kwargs)  # returns once rank 0 stops
        return 0

    built: list[TensorParallelScorer] = []

    def stop_serving() -> None:
        # A rank died: this group cannot score again. Drain and exit 1 so that the
        # supervisor (Kubernetes, systemd) restarts every rank.
        os.kill(os.getpid(), signal.SIGTERM)

    def build() -> TensorParallelScorer:  # on the server's device thread
        try:
            scorer = launch(cfg.tensor_parallel, cfg.model, **kwargs)
        except LayerChoiceError as e:  # the operator's setting: name the flag and variable
            raise LayerChoiceError(f"--layers / ANCHORCREDIT_LAYERS: {e}", e.scorable) from None
        assert scorer is not None  # rank 0
        scorer.on_broken = stop_serving
        built.append(scorer)
        log.info(
            "tensor parallel over %d ranks: this rank holds %d of %d parameters",
            cfg.tensor_parallel,
            scorer.loaded_param_count,
            scorer.total_param_count,
        )
        return scorer

    try:
        code = asyncio.run(serve(cfg, backend_factory=build))
    finally:
        for scorer in built:
            scorer.close()  # the other ranks stop, spawned ones are joined
    return 1 if any(s.broken for s in built) else code
