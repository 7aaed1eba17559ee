"""The coordinator's Ray cluster: its head, nodes view, TLS, token rotation, and drain
on revocation."""
