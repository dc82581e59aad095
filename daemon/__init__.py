"""kvtier.daemon: kvtierd, the per-node block store service (config, block store, gRPC API, metrics)."""
