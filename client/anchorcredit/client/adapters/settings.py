"""What every adapter's Ray setup hook reads from the environment, read in one place.

The client's own settings are ClientConfig's (`ClientConfig.from_env()`: ANCHORCREDIT_TARGETS,
_CACHE, _TIMEOUT_S, _TOKEN, ...; docs/CLIENT.md). On top of them an adapter reads the
credit settings: ANCHORCREDIT_STRATEGY, _SIGN, _PARAMS (a JSON object of credit parameters)
and ANCHORCREDIT_PINNED_VERSION, the one policy version every score is pinned to (no weight
sync then).

ANCHORCREDIT_POLICY_VERSION is the *server's* setting (the version its initial weights
carry). Adapters used to read it as the pin; they still do when ANCHORCREDIT_PINNED_VERSION is
unset, with a DeprecationWarning (and a log line: Ray workers rarely show warnings).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

from anchorcredit.client.client import CreditClient
from anchorcredit.client.config import ENV_PREFIX, ClientConfig
from anchorcredit.contract import DEFAULT_STRATEGY

log = logging.getLogger("anchorcredit.adapters")

PINNED_VERSION_ENV = ENV_PREFIX + "PINNED_VERSION"
LEGACY_PINNED_VERSION_ENV = ENV_PREFIX + "POLICY_VERSION"  # the server's name; deprecated here
STRATEGY_ENV = ENV_PREFIX + "STRATEGY"
SIGN_ENV = ENV_PREFIX + "SIGN"
PARAMS_ENV = ENV_PREFIX + "PARAMS"
# Adapter settings with their own variable: never inside ANCHORCREDIT_PARAMS.
_OWN = {
    "strategy": STRATEGY_ENV,
    "sign": SIGN_ENV,
    "policy_version": PINNED_VERSION_ENV,
    "sync": ENV_PREFIX + "SYNC",
    "sync_transport": ENV_PREFIX + "SYNC_TRANSPORT",
}


def client_from_env(**overrides: Any) -> CreditClient:
    """A CreditClient from ClientConfig.from_env(); `overrides` (field=value) win."""
    return CreditClient(config=ClientConfig.from_env(**overrides))


def pinned_version_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """ANCHORCREDIT_PINNED_VERSION; else the deprecated ANCHORCREDIT_POLICY_VERSION (with a
    DeprecationWarning); else None (no pin)."""
    env = os.environ if environ is None else environ
    if env.get(PINNED_VERSION_ENV):
        return env[PINNED_VERSION_ENV]
    legacy = env.get(LEGACY_PINNED_VERSION_ENV)
    if not legacy:
        return None
    message = (
        f"{LEGACY_PINNED_VERSION_ENV} is the server's initial version; as the version a "
        f"trainer adapter pins its scores to it is deprecated: set {PINNED_VERSION_ENV}"
    )
    warnings.warn(message, DeprecationWarning, stacklevel=2)
    log.warning("%s (read %s=%r as the pin)", message, LEGACY_PINNED_VERSION_ENV, legacy)
    return legacy


def credit_settings_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """{"strategy", "sign", **ANCHORCREDIT_PARAMS} from the environment; a ValueError when
    ANCHORCREDIT_PARAMS holds a setting that has its own variable."""
    env = os.environ if environ is None else environ
    params = json.loads(env.get(PARAMS_ENV, "{}"))
    if not isinstance(params, dict):
        raise ValueError(f"{PARAMS_ENV} must be a JSON object, got {env.get(PARAMS_ENV)!r}")
    clash = {k: v for k, v in _OWN.items() if k in params}
    if clash:
        raise ValueError(
            f"{PARAMS_ENV} holds credit parameters only; set "
            + ", ".join(f"{k!r} with {v}" for k, v in clash.items())
        )
    return {
        **params,
        "strategy": env.get(STRATEGY_ENV, DEFAULT_STRATEGY),
        "sign": env.get(SIGN_ENV, "both"),
    }
