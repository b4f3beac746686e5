"""Trainer hooks: verl, TRL, OpenRLHF, AReaL. Each imports its trainer lazily (on first use).

`anchorcredit.client` never imports these trainers; importing this package imports none
of them either. The shared step, `credit_for_batch`, works on any padded batch.
"""

from anchorcredit.client.adapters.common import credit_for_batch, rows_from_mask

__all__ = ["credit_for_batch", "rows_from_mask"]
