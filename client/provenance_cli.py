"""`client provenance check`: a site checks a copy of the coordinator's log against the
heads it cosigned (`consortium/provenance/witness.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from consortium.cli_errors import cli_errors
from consortium.console import plain_console
from consortium.errors import NotFoundError, ProvenanceInvalidError

provenance_app = typer.Typer(
    help="Check the coordinator's provenance log against what this site witnessed.",
    no_args_is_help=True,
)
console = plain_console()


@provenance_app.command("check")
def check(
    log: Annotated[Path, typer.Option("--log", help="A copy of the coordinator's log.")],
    institution: Annotated[
        str | None, typer.Option(help="Your institution (names the default state dir).")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="This site's state dir (default .consortium-client/INSTITUTION)."),
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(help="Your bundle: also verify the log's signatures with its key."),
    ] = None,
) -> None:
    """Exit 0 when the log extends every head this site cosigned; 14 naming the first
    cosigned head it does not."""
    from consortium.provenance.witness import check_log_copy

    with cli_errors():
        if state_dir is None:
            if institution is None:
                raise NotFoundError("pass --state-dir, or --institution for its default")
            state_dir = Path(".consortium-client") / institution
        if not log.is_file():
            raise NotFoundError(f"log copy {log} does not exist")
        result = check_log_copy(state_dir, log)
        if result.divergence is not None:
            raise ProvenanceInvalidError(
                f"{log} diverges from what this site witnessed: {result.divergence}"
            )
        if result.latest is None:
            raise NotFoundError(
                f"{state_dir} holds no cosigned head: this site has witnessed nothing yet "
                "(it cosigns the log's head each round it trains in)"
            )
        if bundle is not None:
            _verify_signatures(log, bundle, state_dir)
        console.print(
            f"OK {log}: {result.records} records; it extends all {result.heads_checked} "
            f"heads this site cosigned (latest: size {result.latest.tree_size}, root "
            f"{result.latest.root_hash[:16]})"
        )


def _verify_signatures(log: Path, bundle: Path, state_dir: Path) -> None:
    """The log's signatures, with the coordinator key the bundle's CA endorses."""
    from client.bundle import load_bundle
    from consortium.provenance.verify import LogVerificationError, verify_log

    try:
        verify_log(log, load_bundle(bundle, state_dir).coordinator_key)
    except LogVerificationError as error:
        raise ProvenanceInvalidError(f"{log}: {error}") from None
