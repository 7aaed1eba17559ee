"""`client`: an institution's node joins the consortium."""

from __future__ import annotations

import signal
import threading
import tomllib
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from client.provenance_cli import provenance_app
from consortium.cli_errors import cli_errors, configure_logging
from consortium.console import plain_console
from consortium.errors import SettingsError
from consortium.exit_codes import ExitCode
from consortium.file_modes import private_dir, restrict_umask
from consortium.settings import load_settings
from consortium.startup import imports_without_gc

# What joining the Ray pool trusts, said where the flag is chosen (docs/security.md).
RAY_POOL_HELP = (
    "Also contribute this machine to the consortium's shared Ray pool for pretraining "
    "(off by default). Every member holding the cluster token can run code on a pool "
    "node: use it only on a machine dedicated to the consortium, with no site keys or "
    "private data on it. Run as root, the node runs as the OS user consortium-pool, "
    "which cannot read this site's state dir, bundle or data."
)

app = typer.Typer(
    help="Consortium client: join a consortium with this node.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    epilog="Exit codes: " + "; ".join(f"{int(c)} {c.name.lower()}" for c in ExitCode),
)
console = plain_console()


data_app = typer.Typer(help="This site's data: check it, or write example data.")
app.add_typer(data_app, name="data")
app.add_typer(provenance_app, name="provenance")


@app.callback()
def main() -> None:
    """Consortium client."""


def bundle_value(bundle: Path, key: str) -> str | None:
    path = bundle / "bundle.toml"
    try:
        value = tomllib.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError):  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        return None  # load_bundle reports exactly what is wrong with the file
    return str(value) if value is not None else None


@app.command()
def keygen(
    institution: Annotated[str, typer.Option(help="Your institution's name.")],
    state_dir: Annotated[
        Path | None, typer.Option(help="Where the keys go (default .consortium-client/NAME).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace existing keys.")] = False,
) -> None:
    """Create this site's keys and the request to send to the operator."""
    from consortium.site_keys import create_site_keys

    restrict_umask()  # private keys and the request: owner-only
    with cli_errors():
        keys = create_site_keys(
            state_dir or Path(".consortium-client") / institution, institution, force
        )
        console.print(f"private keys (mode 0600, never send them): {keys.state_dir}")
        console.print(f"send this directory to your operator: {keys.request_dir}")


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
    state_dir: Annotated[
        Path | None, typer.Option(help="Keys and logs (default .consortium-client/NAME).")
    ] = None,
    bundle: Annotated[
        Path | None, typer.Option(help="Startup bundle dir from the operator.")
    ] = None,
    metrics_address: Annotated[
        str | None, typer.Option(help="Prometheus /metrics host:port (port 0: any free).")
    ] = None,
    ray: Annotated[
        bool | None,
        typer.Option("--ray/--no-ray", help=RAY_POOL_HELP),
    ] = None,
    ray_port_range: Annotated[
        str | None,
        typer.Option(help="LOW-HIGH: the ports this node's Ray processes listen on."),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="Settings TOML file.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Register this node and run a Flower SuperNode on the local data (and, with --ray,
    a node of the consortium's shared Ray pool), until Ctrl-C."""
    with imports_without_gc():  # Flower's SuperNode side, gRPC, the site's key handling
        from client.join import SiteNode
        from client.settings import ClientSettings

    restrict_umask()  # keys, logs and the ClientApp's state: owner-only
    configure_logging(verbose)
    with cli_errors():
        if bundle is not None:  # the bundle names the institution and the coordinator
            if not bundle.is_dir():
                raise SettingsError(
                    f"--bundle {bundle}: no such directory; pass the startup bundle folder "
                    "`coordinator onboard` wrote for this site"
                )
            coordinator = coordinator or bundle_value(bundle, "coordinator_address")
            institution = institution or bundle_value(bundle, "institution")
        settings = load_settings(
            ClientSettings,
            config,
            coordinator=coordinator,
            institution=institution,
            data=data,
            gpu=gpu,
            insecure=insecure,
            state_dir=state_dir,
            bundle=bundle,
            metrics_address=metrics_address,
            ray_enabled=ray,
            ray_port_range=ray_port_range,
        )
        private_dir(settings.resolved_state_dir)
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        SiteNode(settings, on_event=console.print).run(stop)


@data_app.command("check")
def data_check(
    data: Annotated[Path, typer.Argument(help="The site's data dir.")],
    dataset: Annotated[
        list[str] | None, typer.Option(help="Check only this dataset (repeatable).")
    ] = None,
) -> None:
    """Check every dataset in DATA (or only --dataset) against the format jobs train on."""
    from client.data.check import check_site_data
    from consortium.data.formats import FORMATS

    with cli_errors():
        for checked in check_site_data(data, dataset or ()):
            if checked.known:
                what = FORMATS[checked.name].describe()
                console.print(f"{checked.name}: ok, {checked.examples} examples ({what})")
            else:
                console.print(f"{checked.name}: no job names this dataset; not checked")


@data_app.command("example")
def data_example(
    dataset: Annotated[str, typer.Argument(help="digits or docstrings.")],
    data: Annotated[Path, typer.Argument(help="The data dir to write it into.")],
    part: Annotated[int, typer.Option(help="Which share this site takes (1-based).")] = 1,
    of: Annotated[int, typer.Option("--of", min=1, help="How many sites share it.")] = 1,
) -> None:
    """Write share PART of OF of a dataset's public example data, in the site format."""
    from client.data.check import write_example

    with cli_errors():
        path = write_example(dataset, data, part, of)
        console.print(f"wrote {path}: example {dataset} data, share {part} of {of}")
