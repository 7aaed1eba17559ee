"""The console every command line prints through.

Most of what the commands print is text other parties chose or that is not prose: job
names and messages a member wrote (a site's error text among them), paths, hex digests
and fingerprints. rich would read it as markup and emoji codes: a job named `x[/]` made
the operator's `coordinator jobs list` fail with a MarkupError, `[white on white]`
could hide text in a table, and a CA fingerprint containing `:AB:` was printed with an
emoji in its place. So markup, emoji codes and highlighting are off; a command that
wants a style passes it (`style=`, or `rich.text.Text`).
"""

from __future__ import annotations

from rich.console import Console


def plain_console(*, stderr: bool = False, soft_wrap: bool = False) -> Console:
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False, soft_wrap=soft_wrap)
