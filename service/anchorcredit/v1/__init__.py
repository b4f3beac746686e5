"""Generated gRPC stubs (scripts/gen_proto.py, grpcio-tools 1.85.1). Do not edit."""
