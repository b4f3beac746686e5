"""What the handlers share: the config, the metrics, and (once loaded) the backend and batcher.

Its own module so that the servicer and the weight RPCs (server/weights.py) both take a
typed ServerState without importing each other.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field

from anchorcredit.backend import ModelInfo, ServingBackend
from anchorcredit.server.batcher import Batcher
from anchorcredit.server.config import ServeConfig
from anchorcredit.server.metrics import ServerMetrics


@dataclass
class ServerState:
    """What the handlers share; `backend` and `batcher` are None until the model is loaded."""

    config: ServeConfig
    metrics: ServerMetrics
    backend: ServingBackend | None = None  # the batcher scores, weights.py changes weights
    batcher: Batcher | None = None
    info: ModelInfo | None = None
    # Every version label this server has served -> the digest of its weights (the backend
    # never gives a label to other weights); responses carry the digest.
    labels: dict[str, str] = field(default_factory=dict)
    _out_of_time: asyncio.Future | None = None

    @property
    def out_of_time(self) -> asyncio.Future:
        """Resolved when a stopping server's grace period is about to end: calls still
        running are then refused with UNAVAILABLE (CreditServicer._within_grace)."""
        if self._out_of_time is None:
            self._out_of_time = asyncio.get_running_loop().create_future()
        return self._out_of_time

    @property
    def ready(self) -> bool:
        return self.backend is not None and self.batcher is not None

    def refresh_info(self) -> ModelInfo:
        """Re-read the backend's info (at load and after every reload) and publish it as the
        `anchorcredit_model` metric."""
        assert self.backend is not None
        self.info = self.backend.info()
        self.labels[self.info.policy_version] = self.info.weights_digest
        self.metrics.set_model_info(
            {**asdict(self.info), "max_batch_tokens": self.config.max_batch_tokens}
        )
        self.metrics.credit.policy_changed(self.info.policy_version)
        self.metrics.queue_capacity.set(self.config.max_queue)
        return self.info
