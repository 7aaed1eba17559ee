"""Institution names: what onboarding accepts, and what a site takes from a bundle.

A name becomes a path component at the site (its state dir defaults to
`.consortium-client/<name>`, made owner-only recursively) and a certificate's common
name at the coordinator. The bundle that carries it to the site is signed by nothing,
so the site checks it by the same rule as the operator: letters, digits, '-' and '_'
(`/tmp/x` or `../..` would otherwise have root's `client join` strip the group and
world permissions of a tree of its choosing).
"""

from __future__ import annotations

import re

# ASCII only, as the deploy scripts' shell patterns check it too, with a letter or digit.
NAME = re.compile(r"[A-Za-z0-9_-]*[A-Za-z0-9][A-Za-z0-9_-]*")


def is_institution_name(name: str) -> bool:
    return NAME.fullmatch(name) is not None


def name_problem(name: str) -> str | None:
    """Why `name` cannot name an institution, or None."""
    if is_institution_name(name):
        return None
    return f"institution name {name!r}: use letters, digits, '-' and '_'"
