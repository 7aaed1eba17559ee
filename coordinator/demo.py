"""`coordinator demo`: the whole consortium on one machine.

Creates the consortium (`init`), starts `coordinator serve` (mTLS API, Flower
SuperLink; a Ray head only with ``--ray-pool``), onboards one institution per site with
site-held keys and starts one `client join` per institution as separate processes on
loopback, all
through `LocalConsortium`, the harness the integration tests use too. Each
site holds private data: a non-IID Dirichlet(0.5) share of the digits images and the
docstrings of different installed packages.

The default job is the pipeline: pretrain a byte-level transformer on the Python
standard library at the institutions' sites (federated DiLoCo: each site trains on its
own CPU or GPU and returns a signed pseudo-gradient over the channel it opened; with
``--ray-pool``, on the operator's Ray pool instead), then fine-tune it
federatedly on each site's docstrings, reporting held-out perplexity before and after.
``--job digits`` runs the quick classification example instead. Either way the demo
ends by verifying the provenance log and replaying the aggregation, and stops every
process it started, also on Ctrl-C or failure.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.text import Text

from consortium.data import TEXT_DIR
from consortium.data.digits import train_test_split
from consortium.data.docstrings import DATASET as DOCSTRINGS
from consortium.data.docstrings import DEFAULT_BYTES_PER_PACKAGE, packages_for, site_text
from consortium.data.npz import save_npz
from consortium.data.partition import dirichlet_partition
from consortium.errors import ProvenanceInvalidError
from consortium.proto.v1 import jobs_pb2
from coordinator.cli.remote import Remote
from coordinator.cli.watch import watch_job
from coordinator.local_consortium import LocalConsortium, OwnChildren
from coordinator.wan import COORDINATOR_ADDRESS, WanLayout, describe_links

INSTITUTION_NAMES = (
    "aurora-hospital",
    "borealis-university",
    "cascade-lab",
    "delta-clinic",
    "echo-institute",
    "fjord-college",
    "gamma-centre",
    "helix-labs",
)
DIRICHLET_ALPHA = 0.5
PARTITION_SEED = 7
DEMO_JOBS = ("pipeline", "digits")
PRETRAIN_OUTER_STEPS = 4
PRETRAIN_INNER_STEPS = 30
PRETRAIN_BATCH_SIZE = 8  # sequences per inner step

DEMO_JOB = """\
name = "digits-fedavg-demo"
kind = "federated"
workload = "digits-cnn"
dataset = "digits"
strategy = "fedavg"
rounds = {rounds}
min_clients = {clients}
local_epochs = 2
learning_rate = 0.05
batch_size = 32
seed = 0
"""


# The outer step is plain averaging (outer_lr 1, no momentum), not DiLoCo's paper
# settings (0.7, Nesterov 0.9, made for thousands of outer steps): over the few outer
# steps of a demo or a benchmark, momentum overshoots (the validation loss rose after
# the second step). Measured in process, 3 sites, H = 50, 6 outer steps, final
# validation loss against synchronous data parallelism at equal inner steps: +10.5%
# with the paper's settings, +1.5% averaging (batch 256); batch 8, +6.4% and +2.2%;
# the demo's own 4 x 30 steps, +5.9% and +0.5% (docs/pretraining.md).
PRETRAIN_JOB = """\
name = "stdlib-pretrain-demo"
kind = "pretrain"
placement = "{placement}"
n_layer = 2
n_head = 2
n_embd = 64
block_size = 64
seq_len = 64
batch_size = {batch_size}
inner_steps = {inner_steps}
outer_steps = {outer_steps}
outer_lr = 1.0
outer_momentum = 0.0
num_shards = 12
corpus_bytes = 393216
validation_bytes = 16384
eval_batches = 4
min_workers = {workers}
wait_for_workers_s = 120.0
worker_start_timeout_s = 180.0
step_timeout_s = 600.0
seed = 0
"""

FINE_TUNE_JOB = """\
name = "docstrings-finetune-demo"
kind = "federated"
workload = "bytelm"
dataset = "docstrings"
init_from = "{source}"
rounds = {rounds}
min_clients = {clients}
local_steps = 30
seq_len = 64
batch_size = 8
learning_rate = 0.002
eval_batches = 8
seed = 0
"""


def write_partitions(work_dir: Path, names: list[str]) -> list[Path]:
    """Each institution's own data dir with its Dirichlet share as digits.npz."""
    train, _ = train_test_split()
    parts = dirichlet_partition(train.y, len(names), DIRICHLET_ALPHA, PARTITION_SEED)
    dirs = []
    for name, indices in zip(names, parts, strict=True):
        site = work_dir / "institutions" / name / "data"
        save_npz(site / "digits.npz", train.x[indices], train.y[indices])
        dirs.append(site)
    return dirs


def write_text_partitions(work_dir: Path, names: list[str]) -> list[Path]:
    """Each institution's own text: the docstrings of different packages (non-IID), as
    text/docstrings.txt beside its digits."""
    dirs = []
    for name, packages in zip(names, packages_for(len(names)), strict=True):
        site = work_dir / "institutions" / name / "data"
        (site / TEXT_DIR).mkdir(parents=True, exist_ok=True)
        text = site_text(packages, DEFAULT_BYTES_PER_PACKAGE)
        (site / TEXT_DIR / f"{DOCSTRINGS}.txt").write_bytes(text)
        dirs.append(site)
    return dirs


def run_demo(
    work_dir: Path,
    rounds: int,
    num_institutions: int,
    console: Console,
    job_kind: str = "pipeline",
    outer_steps: int = PRETRAIN_OUTER_STEPS,
    inner_steps: int = PRETRAIN_INNER_STEPS,
    ray_pool: bool = False,
    wan_testbed: str | None = None,
) -> int:
    """Run the demo; returns the last job's final state (a jobs_pb2.JobState value).
    `ray_pool`: pretrain on a Ray pool the sites join, not at the sites. `wan_testbed`:
    the tag of the test bed this process runs in (coordinator/wan.py), whose sites'
    namespaces the `client join`s run in."""
    if job_kind not in DEMO_JOBS:
        raise ValueError(f"unknown demo job {job_kind!r}; known: {', '.join(DEMO_JOBS)}")
    if work_dir.exists():
        shutil.rmtree(work_dir)
    names = list(INSTITUTION_NAMES[:num_institutions])
    data_dirs = write_partitions(work_dir, names)
    write_text_partitions(work_dir, names)
    for name, data_dir in zip(names, data_dirs, strict=True):
        with np.load(data_dir / "digits.npz") as archive:
            count = len(archive["y"])
        text_bytes = (data_dir / TEXT_DIR / f"{DOCSTRINGS}.txt").stat().st_size
        console.print(
            f"{name}: {count} private digit images and {text_bytes // 1024} KiB of "
            f"private text in {data_dir}",
            style="dim",
        )
    layout = WanLayout(wan_testbed, tuple(names)) if wan_testbed is not None else None
    consortium = LocalConsortium(
        work_dir,
        ray=ray_pool,
        launcher=OwnChildren(
            work_dir / "logs", layout.child_namespaces() if layout is not None else None
        ),
        server_names=[COORDINATOR_ADDRESS] if layout is not None else (),
    )
    try:
        console.print("coordinator init: root CA, certificates, signing key, Ray token")
        consortium.init()
        console.print(
            "starting the coordinator (mTLS control-plane API, Flower SuperLink"
            + (", Ray head)..." if ray_pool else ")...")
        )
        consortium.serve(flags=layout.serve_flags(ray_pool) if layout is not None else ())
        if layout is not None:
            console.print(
                f"every site in its own network namespace ({describe_links()}); the "
                f"coordinator at {consortium.address}"
            )
        for name in names:
            bundle = consortium.onboard(name)
            console.print(f"onboarded {name}: keys at the site, bundle {bundle}")
        consortium.wait_for_supernode_keys()
        for name, data_dir in zip(names, data_dirs, strict=True):
            consortium.join(name, data_dir)
        console.print(f"waiting for {num_institutions} institutions to join...")
        consortium.wait_for_online(num_institutions)
        with consortium.connect() as remote:
            pretrained: str | None = None
            if job_kind == "digits":
                job = remote.submit(DEMO_JOB.format(rounds=rounds, clients=num_institutions))
                console.print(f"submitted federated job {job.job_id}: {rounds} rounds of FedAvg")
                final = watch_job(remote, job.job_id, console)
                report(remote, final, console)
            else:
                pretrained, final = run_pipeline(
                    remote,
                    rounds,
                    num_institutions,
                    console,
                    outer_steps,
                    inner_steps,
                    "ray-pool" if ray_pool else "federated",
                )
        if final.state == jobs_pb2.JOB_STATE_SUCCEEDED:
            check_provenance(
                consortium.data_dir,
                final.job_id,
                console,
                pretrained,
                min_witnesses=num_institutions,
            )
        return int(final.state)
    finally:
        console.print("stopping every process the demo started...")
        consortium.stop()
        console.print(f"logs: {work_dir / 'logs'}")


def check_provenance(
    data_dir: Path,
    job_id: str,
    console: Console,
    pretrain_job_id: str | None = None,
    min_witnesses: int = 0,
) -> None:
    """What anyone holding the log and the public key can do: verify (with the sites'
    cosignatures of the latest head: at least `min_witnesses`), then replay (the
    pretraining job's training, and the federated job's aggregation)."""
    from coordinator.cli.provenance import job_records, load_verified
    from coordinator.cli.replay import replay_pretraining_job
    from coordinator.federated.replay import replay_rounds

    log, verified = load_verified(None, None, data_dir)
    head = verified.last_head
    console.print(
        f"provenance: {log} verifies: {verified.records} signed records, "
        f"{verified.signed_updates} institution-signed updates, tree size "
        f"{head.tree_size if head else 0}"
    )
    witnesses = verified.witnesses_of(head) if head else []
    console.print(
        f"provenance: the latest tree head is cosigned by {len(witnesses)} site(s): "
        f"{', '.join(witnesses) or 'none'}"
    )
    if len(witnesses) < min_witnesses:
        raise ProvenanceInvalidError(
            f"the latest tree head is cosigned by {len(witnesses)} site(s), fewer than the "
            f"{min_witnesses} that took part"
        )
    if pretrain_job_id is not None:
        replay_pretraining_job(pretrain_job_id, job_records(verified, pretrain_job_id))
    rounds = replay_rounds(data_dir, job_id, job_records(verified, job_id))
    console.print(
        f"replay: all {len(rounds)} rounds' aggregates reproduced bit for bit from the "
        "retained updates"
    )


def run_pipeline(
    remote: Remote,
    rounds: int,
    num_institutions: int,
    console: Console,
    outer_steps: int = PRETRAIN_OUTER_STEPS,
    inner_steps: int = PRETRAIN_INNER_STEPS,
    placement: str = "federated",
) -> tuple[str, jobs_pb2.Job]:
    """Pretrain (at the sites, or on the Ray pool), then fine-tune federatedly from it;
    returns the pretraining job's id and the fine-tune's final snapshot."""
    pretrain = remote.submit(
        PRETRAIN_JOB.format(
            inner_steps=inner_steps,
            outer_steps=outer_steps,
            batch_size=PRETRAIN_BATCH_SIZE,
            workers=num_institutions,
            placement=placement,
        )
    )
    where = "sites" if placement == "federated" else "Ray pool workers"
    console.print(
        f"submitted pretraining job {pretrain.job_id}: byte-level transformer on the "
        f"standard library, {outer_steps} DiLoCo outer steps of "
        f"{inner_steps} inner steps on {num_institutions} contributed {where} "
        f"(placement = {placement})"
    )
    # Submitted at once: the scheduler starts the fine-tune when its source succeeded.
    fine_tune = remote.submit(
        FINE_TUNE_JOB.format(source=pretrain.job_id, rounds=rounds, clients=num_institutions)
    )
    console.print(
        f"submitted fine-tuning job {fine_tune.job_id}: starts from {pretrain.job_id}'s "
        f"model, {rounds} federated rounds on each site's private text"
    )
    pretrained = watch_job(remote, pretrain.job_id, console)
    if pretrained.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        console.print(f"pretraining ended {pretrained.message}", style="red")
        remote.cancel(fine_tune.job_id)
        return pretrain.job_id, pretrained
    steps = remote.get(pretrain.job_id).rounds
    if steps:
        console.print(
            f"pretrained: validation loss {steps[0].metrics.get('val_loss', float('nan')):.3f} "
            f"-> {steps[-1].metrics.get('val_loss', float('nan')):.3f} nats/byte; "
            f"model {pretrained.model_path}"
        )
    final = watch_job(remote, fine_tune.job_id, console)
    report(remote, final, console)
    return pretrain.job_id, final


def report(remote: Remote, job: jobs_pb2.Job, console: Console) -> None:
    rounds = remote.get(job.job_id).rounds
    if not rounds:
        console.print(f"job {job.job_id} ended with no rounds: {job.message}", style="red")
        return
    first, last = rounds[0], rounds[-1]
    metric = "eval_accuracy" if "eval_accuracy" in last.metrics else "eval_perplexity"
    label = metric.removeprefix("eval_")
    console.print(
        Text.assemble(
            f"\njob {job.job_id}: {job.message}\n",
            f"held-out {label}: {first.metrics.get(metric, float('nan')):.3f} (before) -> ",
            (f"{last.metrics.get(metric, float('nan')):.3f}", "bold"),
            f" after round {last.round}",
        )
    )
    if job.model_path:
        console.print(f"final model: {job.model_path}")
