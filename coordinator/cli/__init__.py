"""The `coordinator` command line.

Set before anything imports gRPC: its core reads GRPC_VERBOSITY once, at start-up, and
prints a refused TLS handshake at INFO, which is how the coordinator learns of one
(`coordinator.tls_refusals`). Flower sets the variable to "error" on import when it is
unset, which would hide those lines.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "INFO")
