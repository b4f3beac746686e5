"""gRPC serving: config (flags == env vars), batcher, servicer, metrics, app (lifecycle).

from anchorcredit.server.app import CreditServer, serve
"""
