"""Job specs and their validation."""
