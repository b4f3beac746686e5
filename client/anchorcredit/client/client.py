"""CreditClient: cached, load-spread, retrying access to one or more CreditService servers.

    from anchorcredit.client import CreditClient
    client = CreditClient(["127.0.0.1:50051"], cache="redis://127.0.0.1:6379/0")
    res = client.score(prompts, responses, strategy="coupled_rhythm")   # token-id lists
    res[0].gamma                                                          # float32 [len(r0)]

A thin facade: the settings are a ClientConfig (config.py), the calls transport.py's, the
scoring part scoring.py's (cache, version pins, pieces over the targets), the weights part
weight_updates.py's (every address, the collective group; push.py does the work), the
replicas replicas.py's, the counters counters.py's. Torch-free: numpy, grpcio, protobuf,
redis, cachetools.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc

from anchorcredit.client import push
from anchorcredit.client.background_push import BackgroundPusher, PushRecord
from anchorcredit.client.cache import CreditCache, make_cache
from anchorcredit.client.config import ClientConfig
from anchorcredit.client.counters import ClientCounters
from anchorcredit.client.errors import StalePolicyVersionError
from anchorcredit.client.replicas import Replica, ReplicaSet, disagreement
from anchorcredit.client.results import CreditResult
from anchorcredit.client.scoring import ModelInfoCache, Scoring
from anchorcredit.client.transport import Transport
from anchorcredit.client.weight_updates import TRANSPORTS, WeightUpdates
from anchorcredit.client.weights import CHUNK_BYTES
from anchorcredit.contract import DEFAULT_STRATEGY
from anchorcredit.v1 import credit_pb2 as pb

__all__ = ["TRANSPORTS", "ClientConfig", "CreditClient"]


class CreditClient:
    """Client of one or more CreditService targets ("host:port", "dns:///name:port").

    cache: None -> in-process LRU bounded in bytes; "redis://..." -> Redis; False -> none;
    or any object with get_many/set_many. timeout_s is each RPC's deadline. Retries follow
    the one retry policy (retry_policy.py) on what the status table calls retryable: a busy
    server (RESOURCE_EXHAUSTED) until retry_budget_s has passed since the call began; no
    target answering (UNAVAILABLE: a restart, a rollout) until reconnect_budget_s has passed
    since none answered, each attempt on the next target; retries caps those attempts when
    set (0: no retries at all). Waits: the server's hint (its queue's drain time) plus
    exponential backoff with full jitter (backoff_base_s doubling up to backoff_max_s).

    Replicas: a score call is pinned to one policy version (policy_version, else the one
    GetModelInfo reports when the call starts); a piece that reaches a replica on other
    weights is re-sent to the addresses serving that version, waiting up to
    replica_wait_s for one when none does (then StalePolicyVersionError naming each
    address's version). `replicas()` reports every address and its version.

    Security: token is the scoring token (every call); admin_token goes only on the
    weight-changing calls (update_weights, push_weights, the weight group). tls=True uses
    TLS, trusting root_certificates (PEM bytes/text or a file; None: the system roots);
    certificate_chain + private_key add a client certificate (mutual TLS). A token sent in
    cleartext to a target off this machine logs a warning.

    Settings: `CreditClient(targets, cache, timeout_s, retries, **settings)` takes
    ClientConfig's fields as arguments (the same names, order and defaults), or
    `CreditClient(config=ClientConfig(...))` / `config=ClientConfig.from_env()` (settings
    given beside `config` override it). `counters()` returns what this client did.
    """

    def __init__(self, *args: Any, config: ClientConfig | None = None, **settings: Any):
        if config is None:
            config = ClientConfig(*args, **settings)
        elif args:
            raise TypeError("give the settings in config= or as arguments, not both")
        elif settings:
            config = config.replace(**settings)
        self.config = config
        self.stats = ClientCounters(config.metrics_registry)
        self.transport = Transport(config, self.stats)
        self.targets = self.transport.targets
        self.replica_set = ReplicaSet(self.transport, self.stats)
        self.cache: CreditCache | None = make_cache(config.cache, ttl_s=config.cache_ttl_s)
        self._model = ModelInfoCache(self.transport)
        self.scoring = Scoring(
            config, self.transport, self.replica_set, self.cache, self._model, self.stats
        )
        self.weights = WeightUpdates(self.transport, self._model, self.stats)
        # pushes in a background thread (background_push.py); score() waits for them
        self.background_pusher = BackgroundPusher(self.push_weights)

    @property
    def timeout_s(self) -> float:
        """Each RPC's deadline in seconds."""
        return self.transport.timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        self.transport.timeout_s = float(value)

    @property
    def retries(self) -> int | None:
        """At most this many retries while no target answers (None: reconnect_budget_s
        alone bounds them; 0: no retries at all)."""
        return self.transport.retries

    @retries.setter
    def retries(self, value: int | None) -> None:
        self.transport.retries = None if value is None else int(value)

    @property
    def last_stats(self) -> dict[str, float]:
        """The last score() call's cache {"hits": n, "misses": m}."""
        return self.scoring.last_stats

    def counters(self) -> dict[str, float]:
        """Everything this client counted so far, as {name: value} (counters.FIELDS: cache
        hits/misses by layer, retries, replica waits, stale-version refusals, score and
        push calls and seconds); also Prometheus metrics when prometheus_client imports."""
        return self.stats.snapshot()

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Leave the weight group (if open); close channels, the worker pool and the cache
        connection."""
        self.background_pusher.close()
        self.weights.close()
        self.scoring.close()
        self.transport.close()
        close = getattr(self.cache, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> CreditClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- model info and replicas ---------------------------------------------------------
    def model_info(self, refresh: bool = False) -> pb.ModelInfo:
        """The served model's info (GetModelInfo), cached until refresh or a stale version.

        It comes from whichever replica answered: its policy_version is that replica's.
        `served_version()` checks that every replica agrees; `replicas()` lists them."""
        return self._model.get(refresh)

    def invalidate_model_info(self) -> None:
        """Forget the cached model info (next call asks the server again)."""
        self._model.invalidate()

    def replicas(self) -> list[Replica]:
        """Every concrete address behind every target (resolved now: a dns name's records,
        an `ipv4:a:p1,b:p2` list) with the policy version it serves (GetModelInfo on each,
        in parallel): [Replica(address, target, policy_version, error)]; a replica that did
        not answer, or a target that did not resolve, has policy_version None and `error`."""
        return self.replica_set.survey()

    def served_version(self) -> str:
        """The policy version every replica serves; a StalePolicyVersionError
        (FAILED_PRECONDITION) naming each address and its version (or its error) when they
        disagree or one does not answer."""
        replicas = self.replicas()
        differ = disagreement(replicas)
        if differ:
            err = StalePolicyVersionError(
                grpc.StatusCode.FAILED_PRECONDITION, f"replicas out of step: {differ}"
            )
            err.versions = {r.address: r.policy_version for r in replicas}  # type: ignore[attr-defined]
            raise err
        return str(replicas[0].policy_version)

    # -- weights (weight_updates.py) -----------------------------------------------------
    def update_weights(
        self, path: str, version: str, *, replaces: str = ""
    ) -> dict[str, pb.UpdateWeightsResponse]:
        """Load the checkpoint at `path` (readable by every server) on every address behind
        every target, as policy `version`; {address: response}.

        Each address is called exactly once, in parallel, over its own channel, with no
        failover (a load on the wrong replica would leave the dead one on old weights).
        replaces: empty, or the version every server must serve now (else it refuses).
        If any address failed, one CreditServiceError names all of them (`.failed`:
        {address: error}) after the others have loaded; then every address must report the
        new version (GetModelInfo).
        """
        return self.weights.update_weights(path, version, replaces)

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
        """Send new policy weights to every address behind every target, without a disk.

        weights: Mapping[str, tensor] or (name, tensor) pairs (torch tensors on any device,
        or numpy arrays), named as the served checkpoint's state_dict keys
        (`anchorcredit.client.weights.full_state_items(model)` gives them for a trained,
        possibly sharded or PEFT model). A one-shot iterable is read once.
        version: the new policy version (non-empty, not the one served); replaces: empty or
        the version that must be served now; partial: True leaves tensors not sent as they
        are. dtype: "auto" (default) sends what the server serves (its ModelInfo dtype, asked
        once per client): a bfloat16/float16 server gets its own dtype (half the bytes of
        float32, rounded as the server would round them), a float32 server gets float32,
        or a tensor's own 16-bit dtype (widened exactly on the server); None sends each
        tensor as it is; "float32" / "bfloat16" / "float16" casts every tensor.
        chunk_bytes: data per stream message (at most CHUNK_BYTES, the servers' limit).
        transport: "grpc" streams PushWeights to each address (tensors go through the
        CPU); "collective" broadcasts over the private group (`open_weight_group`, opened
        with its defaults on first use): gloo from the CPU, NCCL from this CUDA device.
        timeout_s: each address's deadline (default: the client's timeout_s).

        Bad input raises ValueError/TypeError before any RPC. Returns {address: response}
        once every address serves `version`; else one CreditServiceError names every
        address that failed (`.failed`), after the others finished.
        """
        self.background_pusher.wait()  # one push at a time; an unreported failure first
        return self.weights.push_weights(
            weights,
            version,
            partial=partial,
            transport=transport,
            replaces=replaces,
            dtype=dtype,
            chunk_bytes=chunk_bytes,
            timeout_s=timeout_s,
        )

    def push_weights_background(
        self, weights: Any, version: str, *, step: int | None = None, **kwargs: Any
    ) -> PushRecord:
        """push_weights(weights, version, **kwargs) in a background thread; returns at once
        (after the previous background push ended). The next score() waits for it and
        raises BackgroundPushError naming `step` if it failed. `weights` must not change
        until it ends: `background_pusher.fence()` waits for that (background_push.py)."""
        return self.background_pusher.submit(weights, version, step=step, **kwargs)

    def open_weight_group(
        self,
        address: str = "127.0.0.1",
        port: int = 0,
        backend: str = "",
        timeout_s: float = 600.0,
    ) -> push.WeightGroupHandle:
        """Open the private broadcast group for `push_weights(transport="collective")`
        (needs torch): host its store on address:port (an address every server can reach;
        port 0 picks a free one), join as rank 0 while every address behind every target
        joins as rank 1..N (JoinWeightGroup, concurrently). backend "" = nccl when every
        server and this process have CUDA, else gloo. Replaces an open group; `close()`
        leaves it."""
        return self.weights.open_weight_group(address, port, backend, timeout_s)

    # -- scoring (scoring.py) ------------------------------------------------------------
    def score(
        self,
        prompts: Sequence[Any],
        responses: Sequence[Any],
        strategy: str = DEFAULT_STRATEGY,
        policy_version: str | None = None,
        *,
        with_entropy: bool = False,
        **credit_params: Any,
    ) -> list[CreditResult]:
        """Credit for each (prompt, response) pair, in order.

        prompts/responses: token-id sequences (lists, numpy or CPU tensors), no padding.
        strategy: one of anchorcredit.contract.STRATEGIES.
        policy_version: the version the results must come from; None = the version the
        replica answering GetModelInfo serves now (so cached results are keyed on it). Every
        result of one call comes from that one version (`.policy_version`): a piece sent to a
        replica on other weights is re-sent to replicas that serve it; with a pinned version
        and none serving it, the call waits up to replica_wait_s, then raises
        StalePolicyVersionError naming every address and its version.
        credit_params: SPEC.md parameters (q, gamma_amp, alpha, k, tau_waad, tau_delta, seed,
        window, h_lo, h_hi (int, or None / "end" = to the end), head_quantile); None = the
        default. Validated by CreditParams.build (a ValueError naming the parameter, before
        any RPC); every effective value is sent and keyed.
        """
        self.background_pusher.wait()  # never score from weights a push is replacing
        return self.scoring.score(
            prompts,
            responses,
            strategy,
            policy_version,
            with_entropy=with_entropy,
            **credit_params,
        )
