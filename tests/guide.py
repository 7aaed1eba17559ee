"""docs/onboarding.md as a script: the steps its annotated code blocks spell out.

The guide marks each command block with the host it runs on, and each hand-over
between hosts::

    <!-- on: operator -->            the next ```bash block runs at the operator
    <!-- on: site, background -->    ... at every site, left running (serve, join)
    <!-- on: operator, first site --> ... once, for the first site only
    <!-- send: site /var/lib/consortium/request to operator ./request-from-st-olaf -->

A block that names the guide's example institution runs once per site, with that site's
name in its place. tests/integration/test_multi_host.py runs these steps on hosts in
network namespaces, so the guide cannot drift from what works.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "onboarding.md"
EXAMPLE_SITE = "st-olaf-hospital"  # the institution the guide's commands name
EXAMPLE_SHORT = "st-olaf"  # ...and its short form in folder names

_RUN = re.compile(
    r"^[ \t]*<!--\s*on:\s*(?P<host>operator|site)(?P<flags>(?:\s*,\s*[a-z ]+?)*)\s*-->\s*\n"
    r"(?P<indent>[ \t]*)```bash\n(?P<body>.*?)\n[ \t]*```",
    re.MULTILINE | re.DOTALL,
)
_SEND = re.compile(
    r"^[ \t]*<!--\s*send:\s*(?P<source_host>operator|site)\s+(?P<source>\S+)\s+to\s+"
    r"(?P<target_host>operator|site)\s+(?P<target>\S+)\s*-->",
    re.MULTILINE,
)
_KNOWN_FLAGS = frozenset({"background", "first site"})


@dataclass(frozen=True)
class RunStep:
    host: str  # "operator" or "site"
    script: str  # bash, as the guide shows it
    background: bool  # a server: started, left running
    first_site_only: bool
    line: int  # where the block starts in the guide

    @property
    def per_site(self) -> bool:
        return self.host == "site" or EXAMPLE_SHORT in self.script


@dataclass(frozen=True)
class SendStep:
    source_host: str
    source: str
    target_host: str
    target: str
    line: int

    @property
    def per_site(self) -> bool:
        return True  # every hand-over is between the operator and one site


Step = RunStep | SendStep


class GuideError(ValueError):
    """The guide's annotations cannot be read."""


def read_steps(text: str) -> list[Step]:
    """Every annotated block and hand-over, in the guide's order."""
    found: list[tuple[int, Step]] = []
    for match in _RUN.finditer(text):
        flags = {flag.strip() for flag in match["flags"].split(",") if flag.strip()}
        unknown = flags - _KNOWN_FLAGS
        line = text.count("\n", 0, match.start()) + 1
        if unknown:
            raise GuideError(f"line {line}: unknown flag(s) {sorted(unknown)}")
        body = textwrap.dedent(match["body"]) if match["indent"] else match["body"]
        step = RunStep(match["host"], body, "background" in flags, "first site" in flags, line)
        found.append((match.start(), step))
    for match in _SEND.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        send = SendStep(
            match["source_host"], match["source"], match["target_host"], match["target"], line
        )
        found.append((match.start(), send))
    return [step for _, step in sorted(found, key=lambda pair: pair[0])]


def for_site(text: str, site: str) -> str:
    """A command of the guide for institution `site` instead of its example one."""
    marker = "\0site\0"  # so a site name that contains the short form is kept whole
    return text.replace(EXAMPLE_SITE, marker).replace(EXAMPLE_SHORT, marker).replace(marker, site)
