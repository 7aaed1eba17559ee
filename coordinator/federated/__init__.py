"""Federated jobs on a real Flower SuperLink: the SuperLink child, the app, the ServerApp."""
