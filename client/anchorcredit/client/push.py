"""Weight changes on every address: UpdateWeights (path), PushWeights (stream), and the
collective group (JoinWeightGroup / ReceiveWeights / LeaveWeightGroup).

Every concrete address behind every target (Transport.addresses) is called once, in
parallel, over its own channel, with no failover and no retry (a load must not land twice on
one replica while another keeps the old weights). When all calls are done, one
CreditServiceError names every address that failed (`.failed`: {address: error}); else each
address's acknowledgement must name the new version (the server answers only after the commit,
with the version it then serves), and one that does not is an error too. Only an address whose
acknowledgement names no version (an older server) is asked with GetModelInfo: the check rides
on the push's own answer, with no extra round trip per step. torch is imported only by the
collective path.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from anchorcredit.client.errors import CreditServiceError, from_rpc
from anchorcredit.client.transport import Transport
from anchorcredit.client.weights import WeightItem, weight_chunk_bytes
from anchorcredit.v1 import credit_pb2 as pb

log = logging.getLogger("anchorcredit.client")

T = TypeVar("T")
Failed = dict[str, CreditServiceError]


def failure(what: str, failed: Failed, total: int) -> CreditServiceError:
    """One error naming every failed address; `.failed` = {address: error}."""
    first = next(iter(failed.values()))
    detail = "; ".join(str(e) for e in failed.values())
    err = CreditServiceError(
        first.code,
        f"{what} failed on {len(failed)} of {total} addresses ({', '.join(failed)}): {detail}",
    )
    err.failed = failed  # type: ignore[attr-defined]
    return err


def on_every_address(
    addresses: Sequence[str], fn: Callable[[str], T]
) -> tuple[dict[str, T], Failed]:
    """fn(address) on each address in parallel; ({address: result}, {address: error})."""
    results: dict[str, T] = {}
    failed: Failed = {}

    def one(address: str) -> None:
        try:
            results[address] = fn(address)
        except grpc.RpcError as err:
            failed[address] = from_rpc(err, address)
        except CreditServiceError as err:
            failed[address] = err
        except Exception as exc:  # a local failure still names the address
            failed[address] = CreditServiceError(
                grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}", address
            )

    if len(addresses) == 1:
        one(addresses[0])
    else:
        with ThreadPoolExecutor(len(addresses), thread_name_prefix="anchorcredit-push") as ex:
            list(ex.map(one, addresses))
    # in address order, whatever order the threads finished in
    return (
        {a: results[a] for a in addresses if a in results},
        {a: failed[a] for a in addresses if a in failed},
    )


def all_addresses(transport: Transport, what: str) -> list[str]:
    """Every address behind the targets; an error naming targets that did not resolve."""
    addresses, failed = transport.addresses()
    if failed:
        raise failure(what, failed, len(failed) + len(addresses))
    return addresses


def check_serving(transport: Transport, addresses: Sequence[str], version: str, what: str) -> None:
    """Each address must answer GetModelInfo with `version`."""
    timeout = transport.timeout_s

    def ask(address: str) -> str:
        info = transport.address_stub(address).GetModelInfo(
            pb.GetModelInfoRequest(), timeout=timeout, metadata=transport.metadata
        )
        if info.policy_version != version:
            raise CreditServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"serves policy version {info.policy_version!r} after {what} of {version!r}",
                address,
            )
        return info.policy_version

    _, failed = on_every_address(addresses, ask)
    if failed:
        raise failure(f"{what} (version check)", failed, len(addresses))


_SERVED_DTYPE: weakref.WeakKeyDictionary[Transport, str] = weakref.WeakKeyDictionary()


def served_dtype(transport: Transport) -> str:
    """The dtype the service computes in (its ModelInfo), asked once per transport: a
    server's dtype is fixed for its life, so a push does not pay a round trip for it."""
    dtype = _SERVED_DTYPE.get(transport)
    if dtype is None:
        dtype = transport.call("GetModelInfo", pb.GetModelInfoRequest()).dtype
        _SERVED_DTYPE[transport] = dtype
    return dtype


def check_acknowledged(
    transport: Transport,
    done: dict[str, pb.UpdateWeightsResponse],
    version: str,
    what: str,
) -> None:
    """Each address's acknowledgement must name `version`; one that names none (an older
    server) is asked with GetModelInfo instead (check_serving)."""
    failed: Failed = {}
    unnamed = []
    for address, resp in done.items():
        if not resp.policy_version:
            unnamed.append(address)
        elif resp.policy_version != version:
            failed[address] = CreditServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"serves policy version {resp.policy_version!r} after {what} of {version!r}",
                address,
            )
    if failed:
        raise failure(f"{what} (version check)", failed, len(done))
    if unnamed:
        check_serving(transport, unnamed, version, what)


def update_from_path(
    transport: Transport, path: str, version: str, replaces: str
) -> dict[str, pb.UpdateWeightsResponse]:
    """UpdateWeights(path) on every address."""
    what = "UpdateWeights"
    addresses = all_addresses(transport, what)
    req = pb.UpdateWeightsRequest(path=path, version=version, replaces=replaces)

    def load(address: str) -> pb.UpdateWeightsResponse:
        return transport.address_stub(address).UpdateWeights(
            req, timeout=transport.timeout_s, metadata=transport.admin_metadata
        )

    done, failed = on_every_address(addresses, load)
    if failed:
        raise failure(what, failed, len(addresses))
    check_acknowledged(transport, done, version, what)
    return done


def push_stream(
    transport: Transport,
    items: list[WeightItem],
    update: pb.WeightUpdate,
    chunk_bytes: int,
    timeout_s: float,
) -> dict[str, pb.UpdateWeightsResponse]:
    """PushWeights on every address, each its own stream of the same tensors."""
    what = "PushWeights"
    addresses = all_addresses(transport, what)

    def push(address: str) -> pb.UpdateWeightsResponse:
        return transport.address_stub(address).PushWeightsSerialized(
            weight_chunk_bytes(items, update, chunk_bytes),
            timeout=timeout_s,
            metadata=transport.admin_metadata,
        )

    done, failed = on_every_address(addresses, push)
    if failed:
        raise failure(what, failed, len(addresses))
    check_acknowledged(transport, done, update.version, what)
    return done


class WeightGroupHandle:
    """The trainer's side (rank 0) of a private broadcast group joined by every address."""

    def __init__(
        self,
        transport: Transport,
        addresses: list[str],
        address: str = "127.0.0.1",
        port: int = 0,
        backend: str = "",
        timeout_s: float = 600.0,
    ):
        import torch

        from anchorcredit import weight_group

        self.transport = transport
        self.addresses = list(addresses)
        self.timeout_s = float(timeout_s)
        # what a replacement group (new address set) is opened with
        self.open_args = dict(address=address, port=0, backend=backend, timeout_s=timeout_s)
        self.name = f"ac-{uuid.uuid4().hex[:12]}"
        self.closed = False
        what = "JoinWeightGroup"
        # Fail fast on a dead address: a rendezvous with one missing rank waits for timeout_s.
        infos, failed = on_every_address(self.addresses, self._info)
        if failed:
            raise failure(what, failed, len(self.addresses))
        if not backend:
            on_cuda = all(i.device.startswith("cuda") for i in infos.values())
            backend = "nccl" if on_cuda and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        world = len(self.addresses) + 1
        self.store = weight_group.host_store(address, port, world, self.timeout_s)
        self.port = int(self.store.port)
        self.backend = backend
        reqs = {
            a: pb.JoinWeightGroupRequest(
                group=self.name,
                address=address,
                port=self.port,
                world_size=world,
                rank=rank,
                backend=backend,
                timeout_s=self.timeout_s,
            )
            for rank, a in enumerate(self.addresses, start=1)
        }
        futures = {
            a: transport.address_stub(a).JoinWeightGroup.future(
                reqs[a], timeout=self.timeout_s + 30, metadata=transport.admin_metadata
            )
            for a in self.addresses
        }
        try:
            self.group = weight_group.open_group(
                self.store, 0, world, backend, self.device, self.timeout_s
            )
        except Exception as exc:
            for f in futures.values():
                f.cancel()
            _, failed = _settle(futures, 5.0)
            raise failure(
                what, failed or _local(self.addresses, f"rank 0 could not join: {exc}"), world - 1
            ) from exc
        _, failed = _settle(futures, self.timeout_s + 30)
        if failed:
            self.group.close()
            raise failure(what, failed, len(self.addresses))

    def _info(self, address: str) -> pb.ModelInfo:
        return self.transport.address_stub(address).GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self.transport.timeout_s,
            metadata=self.transport.metadata,
        )  # fmt: skip

    def push(
        self, items: list[WeightItem], update: pb.WeightUpdate
    ) -> dict[str, pb.UpdateWeightsResponse]:
        """ReceiveWeights on every address, then broadcast each tensor in list order."""
        if self.closed:
            raise RuntimeError("this weight group is closed")
        what = "ReceiveWeights"
        req = pb.ReceiveWeightsRequest(
            group=self.name, update=update, tensors=[i.header() for i in items]
        )
        futures = {
            a: self.transport.address_stub(a).ReceiveWeights.future(
                req, timeout=self.timeout_s + 30, metadata=self.transport.admin_metadata
            )
            for a in self.addresses
        }
        failed_early = threading.Event()
        for f in futures.values():
            f.add_done_callback(lambda f: f.code() != grpc.StatusCode.OK and failed_early.set())
        sent = threading.Event()
        error: list[BaseException] = []

        def broadcast() -> None:
            try:
                for item in items:
                    if failed_early.is_set():
                        return
                    self.group.broadcast(self._on_device(item))
                if self.device.type == "cuda":
                    import torch

                    torch.cuda.synchronize(self.device)
            except BaseException as exc:  # noqa: BLE001 - reported below
                error.append(exc)
            finally:
                sent.set()

        worker = threading.Thread(target=broadcast, name="anchorcredit-broadcast", daemon=True)
        worker.start()
        while not sent.wait(0.05):
            if failed_early.is_set():  # a receiver gave up: the broadcast can never finish
                break
        if failed_early.is_set() or error:
            # The group is unusable now: drop it, give the other receivers a moment to
            # answer, then cancel them (a cancelled receive leaves the old weights served).
            self.abort()
            sent.wait(10.0)
            _settle(futures, 5.0)
            for f in futures.values():
                f.cancel()
        done, failed = _settle(futures, self.timeout_s + 30)
        if error and not failed:
            failed = _local(self.addresses, f"broadcast failed: {error[0]}")
        if failed:
            raise failure(what, failed, len(self.addresses))
        check_acknowledged(self.transport, done, update.version, what)
        return done

    def _on_device(self, item: WeightItem) -> Any:
        import torch

        from anchorcredit.client.weights import tensor_bytes

        value = item.value
        target = getattr(torch, item.dtype)
        if isinstance(value, torch.Tensor):
            t = value.detach().to(device=self.device, dtype=target)
            return t.contiguous()
        # numpy: through the wire bytes (handles bfloat16 and byte order)
        raw = torch.frombuffer(bytearray(tensor_bytes(item)), dtype=target)
        return raw.reshape(item.shape).to(self.device)

    def abort(self) -> None:
        """Drop a group whose broadcast cannot complete (servers leave it on their side)."""
        if not self.closed:
            self.closed = True
            try:
                self.group.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("closing weight group %s: %s", self.name, exc)

    def close(self) -> None:
        """LeaveWeightGroup on every address (best effort), then free the group."""
        if self.closed:
            return
        req = pb.LeaveWeightGroupRequest(group=self.name)

        def leave(address: str) -> None:
            self.transport.address_stub(address).LeaveWeightGroup(
                req,
                timeout=min(self.transport.timeout_s, 10.0),
                metadata=self.transport.admin_metadata,
            )

        _, failed = on_every_address(self.addresses, leave)
        for a, err in failed.items():
            log.warning("LeaveWeightGroup on %s: %s", a, err)
        self.abort()


def _local(addresses: Sequence[str], message: str) -> Failed:
    return {a: CreditServiceError(grpc.StatusCode.ABORTED, message, a) for a in addresses}


def _settle(futures: dict[str, Any], timeout_s: float) -> tuple[dict[str, Any], Failed]:
    """Wait for gRPC futures; ({address: response}, {address: error})."""
    done: dict[str, Any] = {}
    failed: Failed = {}
    deadline = time.monotonic() + timeout_s
    for a, f in futures.items():
        try:
            done[a] = f.result(timeout=max(0.0, deadline - time.monotonic()))
        except grpc.RpcError as err:
            failed[a] = from_rpc(err, a)
        except grpc.FutureCancelledError:
            failed[a] = CreditServiceError(grpc.StatusCode.CANCELLED, "cancelled", a)
        except grpc.FutureTimeoutError:
            failed[a] = CreditServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer", a)
    return done, failed
