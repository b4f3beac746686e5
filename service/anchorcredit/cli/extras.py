"""Which install extra a subcommand needs, checked before it runs: one line naming the pip
command instead of a traceback from deep inside (the base install is the light client)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

SERVICE = "pip install 'anchorcredit[service]'"
# What the model side imports: torch and transformers, and for serving the gRPC extras.
MODEL = ("torch", "transformers")
SERVING = (*MODEL, "grpc_health", "grpc_reflection", "prometheus_client")


def missing(modules: Sequence[str]) -> list[str]:
    """The modules of `modules` that cannot be imported here (found without importing)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def needs(command: str, modules: Sequence[str], what: str = "") -> str | None:
    """None when every module is installed; else the one-line message for `command`."""
    absent = missing(modules)
    if not absent:
        return None
    purpose = f" {what}" if what else ""
    return (
        f"anchorcredit {command}{purpose} needs the service extra ({', '.join(absent)} "
        f"not installed): {SERVICE}"
    )
