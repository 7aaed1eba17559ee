"""The `coordinator` command line.

gRPC is imported first, on purpose: its core fixes its log verbosity when it starts, and
by default it prints a refused TLS handshake, which is how the coordinator learns of one
(`coordinator.tls_refusals`). Flower sets GRPC_VERBOSITY=error on import when the
variable is unset; imported after gRPC, that reaches only child processes.
"""

import grpc  # noqa: F401
