"""One repair in the Flower SuperLink's own SQLite database that its API cannot make.

Flower keeps an unregistered SuperNode's row, and its public key is UNIQUE there, so
`flwr supernode register` of a key that anyone unregistered fails with "Public key
already in use" for ever; the Control API has no way back. Restoring an onboarded
site whose node an outsider unregistered therefore drops that tombstone row (status
"unregistered" only: an active node is never touched); the key is then registered
through the Control API as usual. It lives here because this package is the only one
that opens SQLite files (an import-linter contract).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from consortium.errors import ChildProcessFailedError


def release_unregistered_node(database: Path, public_key_pem: bytes, timeout_s: float) -> bool:
    """Drop the "unregistered" row holding `public_key_pem`; True if there was one."""
    if not database.exists():
        return False  # no SuperLink yet; connecting would create an empty database
    connection = sqlite3.connect(database, timeout=timeout_s)
    try:
        with connection:
            cursor = connection.execute(
                "DELETE FROM node WHERE public_key = ? AND status = 'unregistered'",
                (public_key_pem,),
            )
        return cursor.rowcount > 0
    except sqlite3.Error as error:
        raise ChildProcessFailedError(
            f"could not release the unregistered SuperNode key in {database}: {error}"
        ) from None
    finally:
        connection.close()
