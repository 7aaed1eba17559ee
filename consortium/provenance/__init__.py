"""Provenance log primitives: the RFC 9162 Merkle tree behind the signed log."""
