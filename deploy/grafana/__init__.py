"""The Grafana dashboard, built from code (`python -m deploy.grafana.build`)."""
