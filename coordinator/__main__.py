"""`python -m coordinator ...`: the `coordinator` command, also from an unpacked source
archive (`coordinator provenance source JOB`) that is not installed."""

from coordinator.cli.main import app

app(prog_name="coordinator")
