"""One log line per thing an install patched, or could not patch and why.

An adapter that installs nothing must say so: a hook that silently does not run leaves
training on plain advantages with no sign of it.
"""

from __future__ import annotations

import logging

log = logging.getLogger("anchorcredit.adapters")


def patched(trainer: str, target: str, what: str) -> None:
    log.info("anchorcredit[%s]: patched %s (%s)", trainer, target, what)


def not_patched(trainer: str, target: str, reason: str) -> None:
    log.warning("anchorcredit[%s]: did not patch %s: %s", trainer, target, reason)


def note(trainer: str, message: str) -> None:
    log.info("anchorcredit[%s]: %s", trainer, message)
