"""Control-plane gRPC API: thin servicers over the registry and job service."""
