"""Deployment assets: Grafana dashboard (as code), Prometheus config and alerts, compose."""
