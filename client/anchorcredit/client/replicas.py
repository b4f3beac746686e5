"""Replicas in step: which policy version each address behind the targets serves, and calls
that reach only the replicas serving a given version.

A target such as `dns:///credit-svc:50051` spreads calls over every pod; after a weight
change the pods may serve different versions for a moment (or longer: a pod the change
missed, a new pod started on the base checkpoint). `survey` asks every address
(GetModelInfo, in parallel); `ReplicaSet.call_on_version` sends a call pinned to one
version to the addresses that serve it, waiting a bounded time for one to appear, and
otherwise refuses with a StalePolicyVersionError naming every address and what it serves.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import grpc

from anchorcredit.client.counters import ClientCounters
from anchorcredit.client.errors import CreditServiceError, StalePolicyVersionError
from anchorcredit.client.push import on_every_address
from anchorcredit.client.retry_policy import RetryClock
from anchorcredit.client.transport import Transport
from anchorcredit.v1 import credit_pb2 as pb

log = logging.getLogger("anchorcredit.client")

SURVEY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Replica:
    """One concrete address behind a target and the policy version it serves (None, with
    `error`, when it did not answer or its target did not resolve)."""

    address: str
    target: str
    policy_version: str | None
    error: CreditServiceError | None = None

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.address} did not answer ({self.error})"
        return f"{self.address} serves {self.policy_version!r}"


def survey(transport: Transport) -> list[Replica]:
    """Every address behind every target (resolved now) with the version it serves, in
    target order; a target that does not resolve is one entry with its error."""
    found, failed = transport.resolve()
    owner: dict[str, str] = {}
    for target, addresses in found.items():
        for a in addresses:
            owner.setdefault(a, target)

    # GetModelInfo is answered at once even by a busy server: a replica silent for longer
    # is reported as not answering rather than holding up the call being routed
    timeout = min(transport.timeout_s, SURVEY_TIMEOUT_S)

    def ask(address: str) -> str:
        info = transport.address_stub(address).GetModelInfo(
            pb.GetModelInfoRequest(), timeout=timeout, metadata=transport.metadata
        )
        return info.policy_version

    versions, errors = on_every_address(list(owner), ask) if owner else ({}, {})
    out: list[Replica] = []
    for target in transport.targets:
        if target in failed:
            out.append(Replica(target, target, None, failed[target]))
            continue
        for a in found.get(target, []):
            if owner.get(a) != target:
                continue  # listed under an earlier target
            out.append(Replica(a, target, versions.get(a), errors.get(a)))
    return out


def disagreement(replicas: list[Replica]) -> str:
    """'' when every replica answered with one version, else what each serves."""
    if not replicas:
        return "no address"
    versions = {r.policy_version for r in replicas}
    if len(versions) == 1 and None not in versions:
        return ""
    return "; ".join(r.describe() for r in replicas)


def lagging_error(
    version: str, replicas: list[Replica], waited_s: float
) -> StalePolicyVersionError:
    """FAILED_PRECONDITION naming every address and what it serves; `.versions` =
    {address: version or None}, `.lagging` = the addresses not serving `version`."""
    err = StalePolicyVersionError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"no replica serves policy version {version!r} (waited {waited_s:.1f} s): "
        + ("; ".join(r.describe() for r in replicas) or "no address"),
    )
    err.versions = {r.address: r.policy_version for r in replicas}  # type: ignore[attr-defined]
    err.lagging = [r.address for r in replicas if r.policy_version != version]  # type: ignore[attr-defined]
    return err


class ReplicaSet:
    """Version-aware calls over every address behind a Transport's targets."""

    def __init__(self, transport: Transport, counters: ClientCounters | None = None):
        self.transport = transport
        self.counters = counters  # replica waits and stale-version refusals, when given
        self._warned: set[tuple[str, frozenset[str]]] = set()
        self._lock = threading.Lock()

    def survey(self) -> list[Replica]:
        return survey(self.transport)

    def call_on_version(self, method: str, request: Any, version: str, wait_s: float) -> Any:
        """`method` on an address that serves `version` (round-robin over them, with the
        transport's failover and retries). When none serves it, ask again with backoff for
        up to `wait_s` seconds (replicas mid-update), then raise lagging_error. A replica
        that moves on between the survey and the call answers FAILED_PRECONDITION, and the
        survey is redone, never an answer from other weights."""
        clock = RetryClock(wait_s)
        attempt = 0
        while True:
            replicas = self.survey()
            serving = [r.address for r in replicas if r.policy_version == version]
            if serving:
                self._note_lag(version, replicas)
                try:
                    return self.transport.call(method, request, addresses=serving)
                except StalePolicyVersionError:
                    # it moved on since the survey: look again
                    if self.counters is not None:
                        self.counters.stale_refusal()
            # the one retry policy's backoff, within wait_s (replicas mid-update)
            before = clock.elapsed
            if not clock.sleep(self.transport.policy.wait(attempt)):
                raise lagging_error(version, replicas, clock.elapsed)
            if self.counters is not None:
                self.counters.replica_wait(clock.elapsed - before)
            attempt += 1

    def _note_lag(self, version: str, replicas: list[Replica]) -> None:
        """Warn once per (version, set of lagging addresses): the replicas are out of step."""
        lagging = frozenset(r.address for r in replicas if r.policy_version != version)
        if not lagging:
            return
        with self._lock:
            if (version, lagging) in self._warned:
                return
            if len(self._warned) > 256:  # one entry per version: forget old ones
                self._warned.clear()
            self._warned.add((version, lagging))
        log.warning(
            "replicas out of step: calls for policy version %r avoid %s",
            version,
            "; ".join(r.describe() for r in replicas if r.address in lagging),
        )
