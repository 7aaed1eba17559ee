"""`client`: an institution's node joins the consortium."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console

from consortium.cli_errors import cli_errors, configure_logging
from consortium.exit_codes import ExitCode
from consortium.settings import load_settings

app = typer.Typer(
    help="Consortium client: join a consortium with this node.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    epilog="Exit codes: " + "; ".join(f"{int(c)} {c.name.lower()}" for c in ExitCode),
)
console = Console()


@app.callback()
def main() -> None:
    """Consortium client."""


@app.command()
def join(
    coordinator: Annotated[
        str | None, typer.Option(help="host:port of the coordinator's control-plane API.")
    ] = None,
    institution: Annotated[str | None, typer.Option(help="Your institution's name.")] = None,
    data: Annotated[
        Path | None, typer.Option(help="Local data dir (never leaves this machine).")
    ] = None,
    gpu: Annotated[int | None, typer.Option(help="Train on this GPU index.")] = None,
    insecure: Annotated[
        bool | None, typer.Option("--insecure", help="Plain text to a loopback coordinator.")
    ] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Where logs go.")] = None,
    config: Annotated[Path | None, typer.Option(help="Settings TOML file.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Register this node, run a Flower SuperNode on the local data, until Ctrl-C."""
    from client.join import SiteNode
    from client.settings import ClientSettings

    configure_logging(verbose)
    with cli_errors():
        settings = load_settings(
            ClientSettings,
            config,
            coordinator=coordinator,
            institution=institution,
            data=data,
            gpu=gpu,
            insecure=insecure,
            state_dir=state_dir,
        )
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        SiteNode(settings, on_event=console.print).run(stop)
