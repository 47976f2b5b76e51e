"""Generated gRPC/protobuf stubs of package alphamath.v1 (`make proto`; do not edit)."""
