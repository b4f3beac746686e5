"""The weights part of CreditClient: new policy weights on every address, checked first.

Argument checks and the choice of route live here; the work itself is push.py's
(`update_from_path`, `push_stream`, `WeightGroupHandle` for the private broadcast group).
Every change invalidates the scoring part's model info (the served version moved on).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from anchorcredit.client import push
from anchorcredit.client.counters import ClientCounters
from anchorcredit.client.scoring import ModelInfoCache
from anchorcredit.client.transport import Transport
from anchorcredit.client.weights import (
    CHUNK_BYTES,
    WIRE_DTYPES,
    auto_wire_dtypes,
    prepare_weights,
)
from anchorcredit.v1 import credit_pb2 as pb

log = logging.getLogger("anchorcredit.client")

TRANSPORTS = ("grpc", "collective")


def check_version(version: Any, replaces: Any) -> None:
    if not isinstance(version, str) or not version:
        raise ValueError(f"version must be a non-empty string, got {version!r}")
    if not isinstance(replaces, str):
        raise ValueError(f"replaces must be a string, got {replaces!r}")
    if replaces == version:
        raise ValueError(f"version {version!r} cannot replace itself")


def check_push_args(transport: str, chunk_bytes: Any, dtype: str | None) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if not isinstance(chunk_bytes, int) or not 0 < chunk_bytes <= CHUNK_BYTES:
        # servers accept messages of CHUNK_BYTES of data (plus framing), no more
        raise ValueError(f"chunk_bytes must be in [1, {CHUNK_BYTES}], got {chunk_bytes!r}")
    if dtype is not None and dtype != "auto" and dtype not in WIRE_DTYPES:
        raise ValueError(f"dtype must be None, 'auto' or one of {WIRE_DTYPES}, got {dtype!r}")


class WeightUpdates:
    """update_weights / push_weights / the weight group of one client."""

    def __init__(self, transport: Transport, model: ModelInfoCache, counters: ClientCounters):
        self.transport = transport
        self.model = model
        self.counters = counters
        self._weight_group: push.WeightGroupHandle | None = None
        self._group_lock = threading.RLock()

    def close(self) -> None:
        """Leave the weight group, if open (never raises)."""
        with self._group_lock:
            try:
                self._close_group()
            except Exception as exc:  # closing must not fail
                log.warning("leaving the weight group: %s", exc)

    def update_weights(
        self, path: str, version: str, replaces: str = ""
    ) -> dict[str, pb.UpdateWeightsResponse]:
        check_version(version, replaces)
        started = time.perf_counter()
        try:
            return push.update_from_path(self.transport, path, version, replaces)
        finally:
            self.model.invalidate()
            self.counters.pushed(time.perf_counter() - started)

    def push_weights(
        self,
        weights: Mapping[str, Any] | Iterable[tuple[str, Any]],
        version: str,
        *,
        partial: bool = False,
        transport: str = "grpc",
        replaces: str = "",
        dtype: str | None = "auto",
        chunk_bytes: int = CHUNK_BYTES,
        timeout_s: float | None = None,
    ) -> dict[str, pb.UpdateWeightsResponse]:
        check_version(version, replaces)
        check_push_args(transport, chunk_bytes, dtype)
        started = time.perf_counter()
        # "auto": checked as floating point here, each wire dtype chosen below (weights.py)
        items = prepare_weights(weights, "float32" if dtype == "auto" else dtype)
        if dtype == "auto":
            items = auto_wire_dtypes(items, push.served_dtype(self.transport))
        update = pb.WeightUpdate(version=version, replaces=replaces, partial=partial)
        try:
            if transport == "grpc":
                timeout = self.transport.timeout_s if timeout_s is None else float(timeout_s)
                return push.push_stream(self.transport, items, update, chunk_bytes, timeout)
            with self._group_lock:
                group = self._group_for_push()
                try:
                    return group.push(items, update)
                finally:
                    if group.closed:  # aborted: the next push opens a fresh group
                        self._weight_group = None
        finally:
            self.model.invalidate()
            self.counters.pushed(time.perf_counter() - started)

    def open_weight_group(
        self, address: str, port: int, backend: str, timeout_s: float
    ) -> push.WeightGroupHandle:
        with self._group_lock:
            self._close_group()
            addresses = push.all_addresses(self.transport, "JoinWeightGroup")
            self._weight_group = push.WeightGroupHandle(
                self.transport, addresses, address, port, backend, timeout_s
            )
            return self._weight_group

    def _group_for_push(self) -> push.WeightGroupHandle:
        group = self._weight_group
        if group is not None and not group.closed:
            addresses, failed = self.transport.addresses()
            if not failed and addresses == group.addresses:
                return group
            log.info("the address set changed (%s); opening a new weight group", addresses)
            self._close_group()
            kw = group.open_args
        else:
            kw = {}
        addresses = push.all_addresses(self.transport, "JoinWeightGroup")
        self._weight_group = push.WeightGroupHandle(self.transport, addresses, **kw)
        return self._weight_group

    def _close_group(self) -> None:
        if self._weight_group is not None:
            group, self._weight_group = self._weight_group, None
            group.close()
