"""Benchmark: one pretraining job across institutions behind WAN links, as federated
pretraining and on a Ray pool, beside synchronous data parallelism (issue 17).

    sudo python benchmarks/wan.py [--sites 3] [--inner-steps 50] [--outer-steps 6]
                                  [--codec int8] [--batch-size 8]
                                  [--work-dir /tmp/consortium-wan]

A real consortium on a test bed (coordinator/wan.py): the coordinator and each site in
a network namespace of its own, every link shaped with `tc netem` (40 ms each way, so
80 ms round trips, 100 Mbit/s, 0.1% loss) or, where the kernel has no sch_netem, with the
same delay and loss from a userspace switch and the rate from `tc tbf` (the benchmark
says which). The sites join with `--ray`, so the same
consortium runs the same job twice: ``placement = "federated"`` (each site trains at
home and returns a signed pseudo-gradient over its Flower channel) and ``placement =
"ray-pool"`` (one Ray actor per site's node, driven over Ray). Then synchronous data
parallelism in this process, one replica per site, every step averaging the sites'
gradients, for the same total inner steps on the same shards.

Per placement it prints: bytes per outer step per site as counted on the site's link
(both directions, every protocol's overhead and idle chatter included), the payload
alone (the model down, the encoded pseudo-gradient up), compute utilisation (the sites'
inner-loop seconds over the outer steps' wall seconds, and over the job's wall time),
the job's wall time, and the final validation loss with its gap to data parallelism.
Targets (issue 17): utilisation >= 90% for federated pretraining at H = 50; its final
validation loss within 3% of data parallelism's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from consortium.inner_loop import corpus_for, enable_determinism, inner_lr_at
from consortium.lm import sample_batch, validation_loss
from consortium.models.bytelm import ByteLM
from consortium.proto.v1 import jobs_pb2
from consortium.provenance.log import records_of
from coordinator.cli.watch import watch_job
from coordinator.demo import (
    INSTITUTION_NAMES,
    PRETRAIN_BATCH_SIZE,
    PRETRAIN_JOB,
    write_partitions,
)
from coordinator.local_consortium import LocalConsortium, OwnChildren
from coordinator.pretraining import PretrainJobSpec, parse_pretrain_spec
from coordinator.pretraining.schedule import assign_shards, derive_seed
from coordinator.pretraining.worker_config import worker_config
from coordinator.wan import (
    COORDINATOR_ADDRESS,
    TESTBED_FLAG,
    WanLayout,
    describe_links,
    interface_bytes,
    run_behind_wan,
)

UTILISATION_TARGET = 0.90
LOSS_TARGET = 0.03
PLACEMENTS = ("federated", "ray-pool")

# The demo's pretraining job (coordinator/demo.py), one worker per site, on CPUs, in
# the codec asked for.
EXTRA = """\
max_workers = {sites}
pseudo_gradient_codec = "{codec}"
device = "cpu"
"""


@dataclass(frozen=True)
class Row:
    method: str
    wire_bytes_per_step: float  # per site, both directions, on its link
    payload_bytes_per_step: float  # per site: model down + pseudo-gradient up
    step_utilisation: float  # inner-loop seconds / outer-step wall seconds
    job_utilisation: float  # inner-loop seconds / the job's wall seconds
    wall_s: float
    val_loss: float


def job_spec(args: argparse.Namespace, placement: str) -> str:
    demo_job = PRETRAIN_JOB.format(
        placement=placement,
        inner_steps=args.inner_steps,
        outer_steps=args.outer_steps,
        # The demo's batch, or a larger one: more compute per inner step for the same
        # model (the same bytes on the wire), as a model that is not a toy's would take.
        batch_size=args.batch_size,
        workers=args.sites,
    )
    return demo_job + EXTRA.format(sites=args.sites, codec=args.codec)


def run_placement(
    consortium: LocalConsortium,
    layout: WanLayout,
    args: argparse.Namespace,
    placement: str,
    console: Console,
) -> Row:
    namespaces = [layout.namespace(site) for site in layout.sites]
    before = [sum(interface_bytes(ns)) for ns in namespaces]
    started = time.monotonic()
    with consortium.connect() as remote:
        job = remote.submit(job_spec(args, placement))
        final = watch_job(remote, job.job_id, console)
        rounds = list(remote.get(job.job_id).rounds)
    wall_s = time.monotonic() - started
    if final.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        raise SystemExit(f"{placement} job ended {final.state}: {final.message}")
    wire = [sum(interface_bytes(ns)) - b for ns, b in zip(namespaces, before, strict=True)]
    steps = [
        entry["body"]
        for entry in records_of(consortium.paths.provenance_log)
        if entry["type"] == "outer_step" and entry["body"]["job_id"] == job.job_id
    ]
    accounting = json.loads(consortium.paths.accounting_file(job.job_id).read_text())
    payload = sum(
        i["bytes_sent"] + i["bytes_received"] for i in accounting["institutions"].values()
    )
    compute = [sum(w["compute_s"] for w in step["workers"]) for step in steps]
    workers = [len(step["workers"]) for step in steps]
    step_wall = [r.metrics["wall_s"] for r in rounds]
    return Row(
        method=f"DiLoCo, {placement} ({args.codec})",
        wire_bytes_per_step=statistics.mean(wire) / args.outer_steps,
        payload_bytes_per_step=payload / args.sites / args.outer_steps,
        step_utilisation=sum(compute) / sum(n * w for n, w in zip(workers, step_wall, strict=True)),
        job_utilisation=sum(compute) / (args.sites * wall_s),
        wall_s=wall_s,
        val_loss=rounds[-1].metrics["val_loss"],
    )


def run_data_parallel(spec: PretrainJobSpec, sites: int) -> Row:
    """Synchronous data parallelism in this process: one model, every step the mean of
    each site's gradient on its own batch (what `sites` replicas all-reducing compute),
    clipped, then the inner AdamW with DiLoCo's schedule; outer_steps x H steps."""
    enable_determinism("cpu")
    corpus = corpus_for(spec)
    config = worker_config(spec, corpus.digest, "cpu")
    shards = assign_shards(spec.num_shards, sites, 0)
    data = [np.concatenate([corpus.shards[i] for i in shards[rank]]) for rank in range(sites)]
    generators = [
        torch.Generator().manual_seed(derive_seed(spec.seed, "dp", r)) for r in range(sites)
    ]
    model = ByteLM(spec.bytelm_config, seed=spec.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=spec.inner_lr,
        weight_decay=spec.inner_weight_decay,
        betas=(0.9, 0.95),
    )
    started = time.monotonic()
    steps = spec.outer_steps * spec.inner_steps
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for rank in range(sites):
            x, y = sample_batch(data[rank], spec.batch_size, spec.seq_len, generators[rank])
            _, loss = model(x, y)
            assert loss is not None
            (loss / sites).backward()  # gradients accumulate: their mean over the sites
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.inner_grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = inner_lr_at(config, step)
        optimizer.step()
    wall_s = time.monotonic() - started
    parameters = sum(p.numel() * 4 for p in model.parameters())
    val = validation_loss(
        model, corpus.validation, spec.seq_len, spec.batch_size, spec.eval_batches
    )
    # Each step a replica sends its gradient and receives the mean: 2 model sizes.
    per_step = 2 * parameters * spec.inner_steps
    return Row("synchronous data parallel (in process)", per_step, per_step, 1.0, 1.0, wall_s, val)


def print_table(rows: list[Row], reference: Row, args: argparse.Namespace) -> None:
    print(
        f"\n{args.sites} sites, H = {args.inner_steps}, {args.outer_steps} outer steps, "
        f"batch {args.batch_size}"
    )
    print(f"links: {describe_links()}")
    print(
        "| method | wire bytes / outer step / site | payload bytes / outer step / site "
        "| utilisation (steps) | utilisation (job) | wall s | final val loss | vs DP |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in [*rows, reference]:
        gap = row.val_loss / reference.val_loss - 1
        print(
            f"| {row.method} | {row.wire_bytes_per_step:,.0f} | {row.payload_bytes_per_step:,.0f} "
            f"| {row.step_utilisation:.1%} | {row.job_utilisation:.1%} | {row.wall_s:.1f} "
            f"| {row.val_loss:.4f} | {gap:+.2%} |"
        )
    federated = dict(zip(args.placements, rows, strict=True)).get("federated")
    if federated is None:
        return  # the targets are federated pretraining's
    gap = federated.val_loss / reference.val_loss - 1
    utilisation = federated.step_utilisation
    print(
        f"\nfederated pretraining: utilisation over its outer steps {utilisation:.1%} "
        f"(target >= {UTILISATION_TARGET:.0%}: {verdict(utilisation >= UTILISATION_TARGET)}); "
        f"final val loss {gap:+.2%} vs data parallel (target within {LOSS_TARGET:.0%}: "
        f"{verdict(abs(gap) <= LOSS_TARGET)})"
    )


def placements(text: str) -> tuple[str, ...]:
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = sorted(set(chosen) - set(PLACEMENTS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown placement(s) {', '.join(unknown) or '(none)'}; choose from "
            f"{', '.join(PLACEMENTS)}"
        )
    return chosen


def verdict(met: bool) -> str:
    return "met" if met else "NOT MET"


def inside(args: argparse.Namespace, tag: str) -> None:
    """In the coordinator's namespace: the consortium, the two jobs, the reference."""
    console = Console()
    sites = tuple(INSTITUTION_NAMES[: args.sites])
    layout = WanLayout(tag, sites)
    work = Path(args.work_dir)
    consortium = LocalConsortium(
        work,
        ray=True,
        launcher=OwnChildren(work / "logs", layout.child_namespaces()),
        server_names=[COORDINATOR_ADDRESS],
    )
    with consortium:
        consortium.init()
        consortium.serve(flags=layout.serve_flags(ray=True))
        for site in sites:
            consortium.onboard(site)
        consortium.wait_for_supernode_keys()
        for site, data in zip(sites, write_partitions(work, list(sites)), strict=True):
            consortium.join(site, data)
        consortium.wait_for_online(len(sites))
        console.print(f"{len(sites)} sites joined across the test bed ({describe_links()})")
        rows = [run_placement(consortium, layout, args, p, console) for p in args.placements]
    spec = parse_pretrain_spec(job_spec(args, "federated"))
    console.print("synchronous data parallel, in process...")
    print_table(rows, run_data_parallel(spec, args.sites), args)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument("--outer-steps", type=int, default=6)
    parser.add_argument("--codec", default="int8", choices=("fp32", "fp16", "int8"))
    parser.add_argument(
        "--batch-size",
        type=int,
        default=PRETRAIN_BATCH_SIZE,
        help=f"sequences per inner step (the demo's: {PRETRAIN_BATCH_SIZE})",
    )
    parser.add_argument(
        "--placements",
        type=placements,
        default=PLACEMENTS,
        help=f"comma-separated, of {', '.join(PLACEMENTS)} (default: both)",
    )
    parser.add_argument(
        "--work-dir",
        default=None,
        help="where the consortium's files go, made afresh (default: a new temporary dir)",
    )
    parser.add_argument(TESTBED_FLAG, dest="testbed", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.testbed is not None:
        inside(args, args.testbed)
        return
    import signal
    import tempfile

    from consortium.errors import ConsortiumError
    from consortium.file_modes import private_dir
    from consortium.tree_removal import remove_tree

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through run_behind_wan: the test bed is removed

    signal.signal(signal.SIGTERM, on_sigterm)  # as `coordinator demo --wan` does
    try:
        # Made here, root's and 0700, before the command inside the test bed writes
        # there: a fixed path in /tmp removed and left to be made later was re-made by
        # another user in between, and root then wrote through that user's links.
        if args.work_dir is None:
            work = Path(tempfile.mkdtemp(prefix="consortium-wan-"))
        else:
            work = Path(args.work_dir)
            if work.is_dir() and not work.is_symlink() and work.stat().st_uid == os.geteuid():
                remove_tree(work)
            private_dir(work)  # refuses one another user made or points elsewhere
        print(f"work dir: {work}")
        argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
        argv += ["--work-dir", str(work)]  # the last one given wins
        sites = INSTITUTION_NAMES[: args.sites]
        code = run_behind_wan(sites, argv, on_links=lambda links: print(f"links: {links}"))
    except ConsortiumError as error:  # no root, no `ip`, a work dir of another user's
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(int(error.exit_code)) from None
    raise SystemExit(code)


if __name__ == "__main__":
    main()
