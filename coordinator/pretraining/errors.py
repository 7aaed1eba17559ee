"""Errors of the pretraining engine, placed in the project's tree (consortium/errors.py)::

ConsortiumError
├── InvalidArgumentError
│   └── JobSpecError                 bad PretrainJobSpec field (spec.py)
├── ConflictError
│   ├── CheckpointMismatchError      checkpoint_dir holds another run's checkpoint
│   ├── ClusterNotConnectedError     no Ray connection in this process
│   └── ControllerFinishedError      step() on a FINISHED or FAILED controller
├── DataDirError                     a worker's corpus differs from the job's (worker.py)
└── PretrainFailedError              max_failed_steps outer steps in a row got too few
    │                                results, or the run failed in its driver (exit
    │                                code JOB_FAILED)
    ├── DriverDiedError              the driver process ended without a result
    └── DriverProtocolError          the driver sent what is not a driver message
"""

from __future__ import annotations

from consortium.errors import ConflictError, ConsortiumError
from consortium.exit_codes import ExitCode


class CheckpointMismatchError(ConflictError):
    """The checkpoint in checkpoint_dir was written by a job with other training fields."""


class ClusterNotConnectedError(ConflictError):
    """Pretraining needs ``ray.init(address=...)`` in this process first."""


class ControllerFinishedError(ConflictError):
    """The controller has nothing left to do."""


class PretrainFailedError(ConsortiumError):
    exit_code = ExitCode.JOB_FAILED


class DriverDiedError(PretrainFailedError):
    """The pretraining driver process ended (crashed, was killed) before its run did."""


class DriverProtocolError(PretrainFailedError):
    """The driver sent a frame that is not one of its messages (not JSON, a malformed
    record, weights that are not safetensors or not the digest named): it is not
    trusted further, and its run ends."""
