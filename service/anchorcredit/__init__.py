"""anchorcredit: per-token credit (WAAD, FAI, gamma_t) from a policy model's attention.

Importing this package stays light (no torch): heavy pieces load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from anchorcredit.runner import Scorer, ScoreResult

__all__ = ["Scorer", "ScoreResult", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import anchorcredit` (and the torch-free client) never pulls in torch.
    if name in ("Scorer", "ScoreResult"):
        from anchorcredit import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'anchorcredit' has no attribute {name!r}")
