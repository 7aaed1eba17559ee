"""Two things in the Flower SuperLink's own SQLite database that its API cannot do.

Flower keeps an unregistered SuperNode's row, and its public key is UNIQUE there, so
`flwr supernode register` of a key that anyone unregistered fails with "Public key
already in use" for ever; the Control API has no way back. Restoring an onboarded
site whose node an outsider unregistered therefore drops that tombstone row (status
"unregistered" only: an active node is never touched); the key is then registered
through the Control API as usual.

And the full FAB hash of a run, which the coordinator signs into the run's approval
(`coordinator/federated/approvals.py`): Flower's CLI prints only a prefix.
Both live here because this package is the only one that opens SQLite files (an
import-linter contract).
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


def run_fab_hash(database: Path, run_id: str, timeout_s: float) -> str:
    """The sha256 of the FAB the SuperLink stored for `run_id` (read from its database,
    not taken from the FAB this coordinator sent: the approval names what Flower runs)."""
    try:
        run = int(run_id)
    except ValueError:
        raise ChildProcessFailedError(f"Flower run id {run_id!r} is not a number") from None
    if run >= 2**63:  # Flower stores uint64 run ids as signed 64-bit integers
        run -= 2**64
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=timeout_s)
    try:
        row = connection.execute("SELECT fab_hash FROM run WHERE run_id = ?", (run,)).fetchone()
    except sqlite3.Error as error:
        raise ChildProcessFailedError(
            f"could not read Flower run {run_id} from {database}: {error}"
        ) from None
    finally:
        connection.close()
    if row is None or not row[0]:
        raise ChildProcessFailedError(f"the SuperLink has no app recorded for run {run_id}")
    return str(row[0])
