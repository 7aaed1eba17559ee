"""Metrics: Prometheus families of the coordinator, live and read from state at scrape time."""
