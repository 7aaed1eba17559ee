"""What an institution signs for each model update it returns.

The statement binds the update to its context, so a signed update cannot be
replayed into another run, round or starting model, nor its weights swapped:
(job, round, global-model digest, update digest, example count, data
commitment, nonce, institution). Both the ClientApp mod (signing) and the
coordinator (verifying, and anyone checking the log) build it with this code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from consortium.provenance.canonical import canonical_json

STATEMENT_VERSION = "consortium-update-v1"


@dataclass(frozen=True)
class UpdateStatement:
    job_id: str
    round: int
    global_digest: str
    update_digest: str
    num_examples: int
    commitment: str
    nonce: str
    institution: str

    def to_bytes(self) -> bytes:
        return canonical_json({"version": STATEMENT_VERSION, **asdict(self)})
