"""The one place where errors become exit codes and one readable line."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

import typer
from rich.text import Text

from consortium.console import plain_console
from consortium.errors import ConsortiumError
from consortium.exit_codes import ExitCode

stderr = plain_console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    try:
        yield
    except ConsortiumError as error:
        stderr.print(Text.assemble(("error: ", "bold red"), str(error)))
        raise typer.Exit(int(error.exit_code)) from None
    except KeyboardInterrupt:
        stderr.print("interrupted")
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        # Flower's Runtime API client logs every request at INFO: the site's task
        # runner and the coordinator's ServerApp launcher poll it several times a second.
        logging.getLogger("httpx").setLevel(logging.WARNING)
