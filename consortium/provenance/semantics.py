"""What a job's records must say to make sense together, checked by `verify_log`.

Signatures and the Merkle tree show that the coordinator wrote each record and never
rewrote one; they do not show that the records tell one coherent history. A run that
crashed once wrote rounds 4 and 5 of a job twice (two ServerApps ran it at once), and
every signature verified. So, per job, in log order:

* at most one `job_started`, and it comes before the job's other records;
* at most one `job_completed`, and nothing of the job after it;
* federated rounds are consecutive and unique (1, 2, 3, ...; a `job_resumed` names the
  last round logged before it), and each round starts from the model the previous one
  ended with: its `global_digest` is the previous round's aggregate (or the previous
  round's own global model when it accepted nothing), the first round's is the
  `job_started` initial model, and a resumed run's model is that same model;
* pretraining outer steps are consecutive and unique (0, 1, 2, ...);
* `job_completed` counts the rounds logged, and its final model digest is the model the
  last round or outer step ended with.

`JobHistory.add` raises `ValueError` naming what is wrong; `verify_log` turns that into
an error at the record's line.
"""

from __future__ import annotations

from dataclasses import dataclass

from consortium.provenance.records import (
    JobCompleted,
    JobResumed,
    JobStarted,
    OuterStep,
    Record,
    Round,
)


@dataclass
class JobHistory:
    """One job's records so far, and the model its next round must start from."""

    job_id: str
    started: bool = False
    completed: bool = False
    records: int = 0
    last_round: int = 0  # rounds are 1-based (an outer step's round is step + 1)
    model_digest: str | None = None  # what the next round starts from, when known

    def add(self, record: Record) -> None:
        if self.completed:
            raise ValueError(f"a record of job {self.job_id} after its job_completed")
        if isinstance(record, JobStarted):
            self._started(record)
        elif isinstance(record, JobResumed):
            self._resumed(record)
        elif isinstance(record, Round):
            self._round(record)
        elif isinstance(record, OuterStep):
            self._outer_step(record)
        elif isinstance(record, JobCompleted):
            self._completed(record)
        self.records += 1

    def _started(self, record: JobStarted) -> None:
        if self.started:
            raise ValueError(f"job {self.job_id} has a second job_started")
        if self.records:
            raise ValueError(f"job {self.job_id}'s job_started follows other records of it")
        self.started = True
        self.model_digest = record.initial_model_digest

    def _resumed(self, record: JobResumed) -> None:
        if record.after_round != self.last_round:
            raise ValueError(
                f"job {self.job_id} resumes after round {record.after_round}, but its last "
                f"logged round is {self.last_round}"
            )
        if record.model_digest is not None:
            self._expect_model(record.model_digest, f"the model job {self.job_id} resumed from")

    def _next_round(self, round_: int, what: str) -> None:
        if round_ <= self.last_round:
            raise ValueError(
                f"{what} of job {self.job_id} is logged again (the last logged is round "
                f"{self.last_round})"
            )
        if round_ != self.last_round + 1:
            raise ValueError(
                f"{what} of job {self.job_id} follows round {self.last_round}: rounds "
                f"{self.last_round + 1}..{round_ - 1} are missing"
            )
        self.last_round = round_

    def _round(self, record: Round) -> None:
        self._next_round(record.round, f"round {record.round}")
        self._expect_model(record.global_digest, f"round {record.round}'s global model")
        self.model_digest = record.aggregate_digest or record.global_digest

    def _outer_step(self, record: OuterStep) -> None:
        if record.round != record.step + 1:
            raise ValueError(f"outer step {record.step} is logged as round {record.round}")
        self._next_round(record.round, f"outer step {record.step}")
        self.model_digest = record.model_digest

    def _completed(self, record: JobCompleted) -> None:
        if record.rounds is not None and record.rounds != self.last_round:
            raise ValueError(
                f"job {self.job_id} completed after {record.rounds} rounds, but "
                f"{self.last_round} are logged"
            )
        if self.last_round:
            self._expect_model(record.final_model_digest, f"job {self.job_id}'s final model")
        self.completed = True

    def _expect_model(self, digest: str, what: str) -> None:
        if self.model_digest is not None and digest != self.model_digest:
            raise ValueError(
                f"{what} is {digest[:16]}, not {self.model_digest[:16]}, the model the "
                "previous round ended with"
            )
        self.model_digest = digest
