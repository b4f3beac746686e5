"""The test suite's tiny debug models, for the benches that run without a real model.

They live in tests/support/debug_model.py (test-only models stay out of the package);
benches and tests are both repository tools, so the benches import that one file by
path rather than keeping a second copy of it.
"""

from __future__ import annotations

import sys
from pathlib import Path

_SUPPORT = Path(__file__).resolve().parents[1] / "tests" / "support"
if str(_SUPPORT) not in sys.path:
    sys.path.insert(0, str(_SUPPORT))

from debug_model import build_debug_model, save_debug_model  # noqa: E402

__all__ = ["build_debug_model", "save_debug_model"]
