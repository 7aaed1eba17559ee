"""`python -m client ...`: the `client` command, also from an unpacked source archive."""

from client.cli import app

app(prog_name="client")
