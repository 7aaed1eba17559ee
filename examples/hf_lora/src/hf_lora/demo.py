"""The Hugging Face LoRA example across the demo's institutions, in one command:

    python -m hf_lora.demo [--rounds 3] [--institutions 3] [--work-dir DIR]

It builds a tiny random Llama-style model with its own tokenizer (nothing is
downloaded), starts a whole consortium on this machine exactly as `coordinator demo`
does (coordinator without Ray, onboarding, one `client join` per institution, each site holding the
docstrings of different packages as private text), lets every site run `hf-lora`
beside the built-in workloads, and runs one federated LoRA job. It reports held-out
perplexity before and after, the bytes that travelled per round against the full
model's, then verifies the provenance log and replays every round's aggregate bit for
bit. Exits 0 when the job succeeded and its provenance checks out.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from consortium.cli_errors import cli_errors, configure_logging
from consortium.console import plain_console
from consortium.exit_codes import ExitCode
from consortium.file_modes import restrict_umask
from consortium.proto.v1 import jobs_pb2
from consortium.workloads import BUILTIN_WORKLOADS
from coordinator.cli.watch import watch_job
from coordinator.demo import INSTITUTION_NAMES, check_provenance, report, write_text_partitions
from coordinator.local_consortium import LocalConsortium
from hf_lora.base_model import ROOTS_ENV, parameter_count
from hf_lora.make_tiny import make_tiny_model

WORKLOAD = "hf-lora"
JOB = """\
name = "hf-lora-demo"
workload = "hf-lora"
dataset = "docstrings"
rounds = {rounds}
min_clients = {clients}
local_steps = {steps}
seq_len = {seq_len}
batch_size = 8
learning_rate = 0.01
eval_batches = 4
seed = 0
round_timeout_s = 600.0

[model_options]
base_model = "{base_model}"
base_model_digest = "{digest}"
lora_r = 8
lora_alpha = 16
target_modules = "q_proj,v_proj"
"""


def job_spec(
    base_model: Path, digest: str, rounds: int, clients: int, steps: int = 20, seq_len: int = 64
) -> str:
    return JOB.format(
        rounds=rounds,
        clients=clients,
        steps=steps,
        seq_len=seq_len,
        base_model=base_model,
        digest=digest,
    )


def adapter_bytes(model_path: Path) -> int:
    """Bytes of the adapters a job ended with (its model file holds only what travels),
    which is what each site sends, and receives, every round."""
    from safetensors.numpy import load_file

    return sum(array.nbytes for array in load_file(model_path).values())


def run(work_dir: Path, rounds: int, institutions: int, steps: int, console: Console) -> int:
    """Run the example; returns the job's final state (a jobs_pb2.JobState value)."""
    if work_dir.exists():
        shutil.rmtree(work_dir)
    names = list(INSTITUTION_NAMES[:institutions])
    data_dirs = write_text_partitions(work_dir, names)
    base_model = (work_dir / "models" / "tiny-llama").resolve()
    # The one place this machine's coordinator and sites (started below, inheriting
    # the environment) let a job name a base model directory.
    os.environ[ROOTS_ENV] = str(base_model.parent)
    console.print("building the base model: a tiny random Llama and its BPE tokenizer...")
    digest = make_tiny_model(base_model)
    spec = job_spec(base_model, digest, rounds, institutions, steps)
    parameters = parameter_count(base_model)
    console.print(f"base model {base_model} (digest {digest[:16]}...): {parameters:,} parameters")
    allowed = json.dumps([*BUILTIN_WORKLOADS, WORKLOAD])
    consortium = LocalConsortium(work_dir, ray=False)  # federated only: no Ray cluster
    try:
        console.print("coordinator init, serve, and onboarding of every institution...")
        consortium.init()
        consortium.serve()
        for name in names:
            consortium.onboard(name)
        consortium.wait_for_supernode_keys()
        for name, data_dir in zip(names, data_dirs, strict=True):
            # Each site agrees to run the workload in its own settings.
            consortium.join(name, data_dir, env={"CONSORTIUM_CLIENT_WORKLOADS": allowed})
        console.print(f"waiting for {institutions} institutions to join...")
        consortium.wait_for_online(institutions)
        with consortium.connect() as remote:
            job = remote.submit(spec)
            console.print(
                f"submitted job {job.job_id}: LoRA on each site's private text, {rounds} rounds"
            )
            final = watch_job(remote, job.job_id, console)
            report(remote, final, console)
        if final.model_path:
            adapters, full = adapter_bytes(Path(final.model_path)), parameters * 4
            console.print(
                f"LoRA adapters {adapters:,} bytes per site and round, "
                f"{100 * adapters / full:.1f}% of the full model's {full:,}"
            )
        if final.state == jobs_pb2.JOB_STATE_SUCCEEDED:
            check_provenance(consortium.data_dir, final.job_id, console, min_witnesses=institutions)
        return int(final.state)
    finally:
        console.print("stopping every process the example started...")
        consortium.stop()
        console.print(f"logs: {work_dir / 'logs'}")


app = typer.Typer(add_completion=False)


@app.command()
def main(
    work_dir: Annotated[Path, typer.Option(help="Where the example keeps everything.")] = Path(
        ".consortium-hf-demo"
    ),
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 3,
    institutions: Annotated[int, typer.Option(min=2, max=8)] = 3,
    local_steps: Annotated[
        int, typer.Option(min=1, help="AdamW steps per round at each site.")
    ] = 20,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """The Hugging Face LoRA example across the demo's institutions (see the module doc)."""
    restrict_umask()
    configure_logging(verbose)
    with cli_errors():
        state = run(work_dir, rounds, institutions, local_steps, plain_console())
    if state == jobs_pb2.JOB_STATE_CANCELLED:
        raise typer.Exit(int(ExitCode.JOB_CANCELLED))
    if state != jobs_pb2.JOB_STATE_SUCCEEDED:
        raise typer.Exit(int(ExitCode.JOB_FAILED))


if __name__ == "__main__":
    app()
