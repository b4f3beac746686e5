"""AReaL worker entry point: install anchorcredit's hooks, then run AReaL's RPC server.

`python -m anchorcredit.client.adapters.areal_worker <AReaL's rpc_server arguments>` is
the command AReaL's single-controller scheduler runs for the actor workers once
`install` / `install_weight_sync` were called in the controller (areal_controller.py). The
settings come from ANCHORCREDIT_AREAL; the client from them (targets) and the worker's
ANCHORCREDIT_* client settings (ClientConfig.from_env: _CACHE, _TOKEN, _ADMIN_TOKEN,
_TIMEOUT_S, ...). Then AReaL's own
`areal.infra.rpc.rpc_server` runs as its `__main__`, with the same arguments.
"""

from __future__ import annotations

import runpy
from collections.abc import Callable

from anchorcredit.client.adapters import install_log
from anchorcredit.client.adapters.areal_controller import SETTINGS_ENV, settings_from_env
from anchorcredit.client.client import CreditClient
from anchorcredit.client.config import ClientConfig


def client_from_env(targets: list[str]) -> CreditClient:
    """The worker's client: the controller's targets, the rest ClientConfig.from_env()."""
    return CreditClient(config=ClientConfig.from_env(targets=tuple(targets)))


def install_from_env() -> list[Callable[[], None]]:
    """Install what ANCHORCREDIT_AREAL asks for in this process; returns the undo functions."""
    from anchorcredit.client.adapters.areal import install_in_process
    from anchorcredit.client.adapters.areal_sync import install_weight_sync_in_process

    settings = settings_from_env()
    if settings is None:
        install_log.not_patched("areal", "this worker", f"{SETTINGS_ENV} is not set")
        return []
    client = client_from_env(settings["targets"])
    undo = []
    credit = settings.get("credit")
    if credit is not None:
        kwargs = {k: v for k, v in credit.items() if k != "params" and v is not None}
        undo.append(install_in_process(client, **kwargs, **credit["params"]))
    sync = settings.get("sync")
    if sync is not None:
        undo.append(install_weight_sync_in_process(client, **sync)[1])
    return undo


def main() -> None:
    install_from_env()
    runpy.run_module("areal.infra.rpc.rpc_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
