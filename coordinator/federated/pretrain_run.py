"""Federated pretraining: a pretraining job whose inner loops run at the institutions'
own sites, driven from the ServerApp (``placement = "federated"``, the default).

The ServerApp of the job's Flower run builds a `DiLoCoController` whose workers are the
online sites (`FlowerSites`): each outer step sends every planned site the global model,
its shards, seed and H over the channel the site's `client join` opened, admits the
signed pseudo-gradients that come back, and applies the outer step here, exactly as the
Ray pool's runs do (the same controller: planning, codecs, spot checks, checkpoints).
Each step is recorded as a Ray-pool step is (`StepRecorder`: the job's round, a signed
`outer_step` record, accounting), through the job's `RunningJob` and fenced by it, with
the sites' cosignatures of the head they were sent after it. A resumed run (the
coordinator restarted, the ServerApp died) continues from the job's checkpoint.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from consortium.inner_loop import corpus_for
from coordinator.data_dir import DataDir
from coordinator.federated.diloco_sites import FlowerSites
from coordinator.federated.prompt_grid import PromptGrid
from coordinator.federated.strategy import WitnessLog
from coordinator.federated.witness_query import FINAL_WITNESS_TIMEOUT_S, witness_latest_head
from coordinator.jobs.running import RunningJob
from coordinator.pretraining.api import result_of
from coordinator.pretraining.diloco import DiLoCoController
from coordinator.pretraining.records import ControllerState, OuterStepRecord
from coordinator.pretraining.runner import StepRecorder, save_result
from coordinator.pretraining.spec import PretrainJobSpec
from coordinator.pretraining.worker_config import worker_config

log = logging.getLogger(__name__)

RUNNING_MESSAGE = "pretraining at the institutions' sites (federated)"


class FederatedPretrainRun:
    def __init__(self, data_dir: Path, job: RunningJob, spec: PretrainJobSpec) -> None:
        self.data_dir = data_dir
        self.job = job
        self.job_id = job.job_id
        self.spec = spec
        self.current_round = 0  # the round being committed (named in a refusal)
        self.stop = threading.Event()

    def run(self, grid: PromptGrid) -> None:
        job, spec = self.job, self.spec
        recorder = StepRecorder(
            job,
            self.data_dir,
            self.job_id,
            fence=job.ensure_current,
            running_message=RUNNING_MESSAGE,
        )
        recorder.log_start(spec)
        provenance = recorder.provenance
        sites = FlowerSites(
            grid,
            job,
            self.job_id,
            # The device is each site's own; the message carries the rest.
            worker_config(spec, corpus_for(spec).digest, "cpu"),
            spec.device,
            WitnessLog(provenance.log.path, provenance.coordinator_key_id),
            self.stop,
        )

        def on_step(record: OuterStepRecord) -> None:
            self.current_round = record.step + 1
            recorder.on_step(record)  # the commit (fenced: a stale run's is refused)
            # The sites' cosignatures of the head their step was sent with, after it.
            provenance.cosignatures(sites.cosignatures([r.worker for r in record.results]))
            if job.is_cancelled():
                self.stop.set()

        checkpoints = DataDir(self.data_dir).checkpoints(self.job_id)
        with DiLoCoController(
            spec,
            sites,
            checkpoints,
            stop=self.stop,
            on_wait=recorder.on_wait,
            inner_loops=sites,
            fence=job.ensure_current,  # a stale run checkpoints nothing
        ) as controller:
            controller.run(on_step)
            result = result_of(controller)
        if result.state is not ControllerState.FINISHED:
            log.info("job %s stopped after %d outer steps", self.job_id, result.steps_completed)
            return
        model_path, message = save_result(self.data_dir, self.job_id, result, recorder)
        witnesses = witness_latest_head(grid, provenance, job, FINAL_WITNESS_TIMEOUT_S)
        log.info("job %s: the final head is cosigned by %s", self.job_id, witnesses or "no site")
        job.succeed(message, str(model_path))
