"""anchorcredit.client: the light client (numpy, grpcio, protobuf, redis; never torch)."""
