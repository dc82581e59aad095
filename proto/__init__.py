"""Generated gRPC code for the kvtier.v1 API lives here; see proto/v1/kvtier.proto."""
