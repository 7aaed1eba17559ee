"""Refusals that only a component's own log records (gRPC TLS, Flower Fleet, Ray GCS),
logged and counted."""
