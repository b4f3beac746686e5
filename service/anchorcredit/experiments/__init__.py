"""Reproducible experiments built on the service (not on the serving path): the Countdown
A/B of GRPO with and without anchorcredit credit (`anchorcredit experiment countdown`)."""
