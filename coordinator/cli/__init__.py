"""The `coordinator` command line.

gRPC is imported here, first, on purpose. Its core fixes its log verbosity when it
starts, and at its default verbosity it prints a refused TLS handshake, which is how the
coordinator learns of one (`coordinator.access.refusals.control_plane`). Flower sets
GRPC_VERBOSITY=error on import when the variable is unset, and a process that imported
Flower passes that on to its children; so the coordinator drops the variable for itself
before gRPC starts. (Its SuperLink and Ray head get GRPC_VERBOSITY=error explicitly.)
"""

import os

os.environ.pop("GRPC_VERBOSITY", None)

import grpc  # noqa: F401
