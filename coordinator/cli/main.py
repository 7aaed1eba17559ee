"""`coordinator`: serve the consortium, manage jobs, run the demo."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.table import Table

from consortium.cli_errors import cli_errors, configure_logging
from consortium.console import plain_console
from consortium.errors import InvalidArgumentError
from consortium.exit_codes import EXIT_CODE_HELP, ExitCode
from consortium.file_modes import private_dir, restrict_umask
from consortium.processes import venv_executable
from consortium.proto.v1 import status_pb2
from consortium.settings import load_settings
from consortium.startup import imports_without_gc
from coordinator.cli import onboarding as onboarding_cli
from coordinator.cli.accounting import accounting
from coordinator.cli.provenance import provenance_app
from coordinator.cli.remote import connect
from coordinator.cli.replay import replay
from coordinator.cli.watch import describe_round, state_name, watch_job
from coordinator.settings import CoordinatorSettings

app = typer.Typer(
    help="Consortium coordinator: serve, jobs, demo.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    epilog="Exit codes: " + "; ".join(f"{int(c)} {c.name.lower()}" for c in ExitCode),
)
jobs_app = typer.Typer(help="Submit, list, watch and cancel jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(provenance_app, name="provenance")
app.command("replay")(replay)
app.command("init")(onboarding_cli.init)
app.command("onboard")(onboarding_cli.onboard)
app.command("server-certificate")(onboarding_cli.server_certificate)
app.command("revoke")(onboarding_cli.revoke)
app.command("renew")(onboarding_cli.renew)
app.command("replace-signing-key")(onboarding_cli.replace_signing_key)
app.command("accounting")(accounting)
console = plain_console()

DataDir = Annotated[
    Path, typer.Option("--data-dir", help="Coordinator data dir (state, models, logs).")
]
CoordinatorAddress = Annotated[
    str | None,
    typer.Option(
        "--coordinator",
        envvar="CONSORTIUM_COORDINATOR_ADDRESS",
        help="host:port of the control-plane API (default: read from the data dir).",
    ),
]


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(help="Settings TOML file.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data dir (default .consortium).")] = None,
    listen_address: Annotated[
        str | None, typer.Option(help="Control-plane API host:port (port 0: any free).")
    ] = None,
    public_host: Annotated[
        str | None,
        typer.Option(
            help="Name or address sites reach this coordinator by (in its server certificate;"
            " default: the --listen-address host)."
        ),
    ] = None,
    fleet_edge_address: Annotated[
        str | None,
        typer.Option(help="Fleet edge host:port that sites' SuperNodes reach (0.0.0.0: all)."),
    ] = None,
    superlink_port: Annotated[
        int | None, typer.Option(help="Flower SuperLink port, on loopback (0: any free).")
    ] = None,
    metrics_address: Annotated[
        str | None, typer.Option(help="Prometheus /metrics host:port (port 0: any free).")
    ] = None,
    insecure: Annotated[
        bool | None,
        typer.Option("--insecure", help="Plain text on loopback, for experiments only."),
    ] = None,
    ray: Annotated[
        bool | None,
        typer.Option("--ray/--no-ray", help="Start (or attach to) Ray for pretraining jobs."),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="host:port of an existing Ray cluster to attach to (no own head)."),
    ] = None,
    ray_host: Annotated[
        str | None,
        typer.Option(help="Address the Ray head binds and announces to nodes (an IP address)."),
    ] = None,
    ray_port: Annotated[
        int | None, typer.Option(help="Port of the Ray head's GCS (0: any free).")
    ] = None,
    ray_port_range: Annotated[
        str | None,
        typer.Option(help="LOW-HIGH: the Ray head's other listening ports (a firewall range)."),
    ] = None,
    ray_tls: Annotated[
        bool | None,
        typer.Option(
            "--ray-tls/--no-ray-tls",
            help="Mutual TLS from the consortium CA on the Ray channel too (beside the token).",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the coordinator until Ctrl-C or SIGTERM."""
    with imports_without_gc():  # the servers, the SuperLink's and Ray's wrappers, state
        from coordinator.serve import Coordinator

    restrict_umask()  # state, keys, logs and the SuperLink database: owner-only
    configure_logging(verbose)
    with cli_errors():
        settings = load_settings(
            CoordinatorSettings,
            config,
            data_dir=data_dir,
            listen_address=listen_address,
            public_host=public_host,
            fleet_edge_address=fleet_edge_address,
            superlink_port=superlink_port,
            metrics_address=metrics_address,
            insecure=insecure,
            ray_enabled=ray,
            ray_address=ray_address,
            ray_host=ray_host,
            ray_port=ray_port,
            ray_port_range=ray_port_range,
            ray_tls=ray_tls,
        )
        private_dir(settings.data_dir)
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        coordinator = Coordinator(settings)
        ray_address = coordinator.ray_cluster.address if coordinator.ray_cluster else "off"
        console.print(
            f"coordinator ready: API {coordinator.address}, "
            f"SuperLink {coordinator.superlink.address}, Ray {ray_address}, "
            f"data {settings.data_dir}"
        )
        try:
            # The runtimes are supervised (restarted when they die) by the coordinator.
            stop.wait()
        finally:
            coordinator.stop()


@app.command()
def nodes(
    coordinator: CoordinatorAddress = None,
    data_dir: DataDir = Path(".consortium"),
) -> None:
    """List nodes: the registry's (state, last heartbeat) with their Ray side (state,
    resources), then Ray nodes that match no registered node (such as the head)."""
    from consortium.proto.v1 import nodes_pb2
    from coordinator.ray.nodes import RayNodeInfo

    with cli_errors(), connect(coordinator, data_dir) as remote:
        overview = remote.nodes_overview()
        now = time.time()
        not_in_ray = "not in Ray" if not overview.ray_unavailable_reason else "unknown"
        table = Table(
            "node",
            "institution",
            "host",
            "device",
            "state",
            "heartbeat",
            "ray",
            "counts for",  # the institution its Ray work counts for, as the coordinator says
            "resources",
        )
        for node in overview.nodes:
            state = nodes_pb2.NodeState.Name(node.state).removeprefix("NODE_STATE_").lower()
            heartbeat = (
                f"{max(now - node.last_heartbeat_ms / 1000, 0):.0f}s ago"
                if node.last_heartbeat_ms
                else "-"
            )
            has_ray = node.HasField("ray")
            table.add_row(
                node.node_id[:12],
                node.institution,
                node.hostname,
                node.device,
                state,
                heartbeat,
                node.ray.state if has_ray else not_in_ray,
                (node.ray.counted_for or "-") if has_ray else "",
                _describe_resources(node.ray.resources) if has_ray else "",
            )
        for ray_node in overview.unmatched_ray_nodes:
            info = RayNodeInfo(ray_node.ray_node_id, ray_node.state, labels=dict(ray_node.labels))
            table.add_row(
                "ray:" + ray_node.ray_node_id[:8],
                info.institution or "-",
                ray_node.address,
                "-",
                "Ray head" if ray_node.is_head else "not registered",
                "-",
                ray_node.state,
                ray_node.counted_for or "-",
                _describe_resources(ray_node.resources),
            )
        console.print(table)
        if overview.ray_unavailable_reason:
            console.print(f"Ray unavailable: {overview.ray_unavailable_reason}")
        for line in _runtimes_down(remote.status()):
            console.print(line)


def _runtimes_down(reply: status_pb2.GetStatusResponse) -> list[str]:
    """One line per runtime of the coordinator that is not running, saying why."""
    return [
        f"{runtime.name}: {_runtime_state(runtime)} ({runtime.detail})"
        for runtime in reply.runtimes
        if runtime.name in reply.degraded
    ]


def _runtime_state(runtime: status_pb2.Runtime) -> str:
    return status_pb2.RuntimeState.Name(runtime.state).removeprefix("RUNTIME_STATE_").lower()


@app.command()
def status(
    coordinator: CoordinatorAddress = None,
    data_dir: DataDir = Path(".consortium"),
) -> None:
    """Show the coordinator's runtimes (its Flower SuperLink and Ray head): state,
    restarts, last exit code, and why one is not running. Exits 18 (degraded) when one
    is restarting or failed."""
    with cli_errors(), connect(coordinator, data_dir) as remote:
        reply = remote.status()
        table = Table("runtime", "state", "restarts", "last exit", "address", "detail")
        for runtime in reply.runtimes:
            table.add_row(
                runtime.name,
                _runtime_state(runtime),
                str(runtime.restarts),
                str(runtime.last_exit_code) if runtime.HasField("last_exit_code") else "-",
                runtime.address,
                runtime.detail,
            )
        console.print(table)
        uptime = f"up {reply.uptime_s} s"
        if reply.degraded:
            console.print(f"degraded ({uptime}): {', '.join(reply.degraded)} not running")
            raise typer.Exit(int(ExitCode.DEGRADED))
        console.print(f"all runtimes running ({uptime})")


def _describe_resources(resources: Mapping[str, float]) -> str:
    """Ray's resource totals as `CPU 1, GPU 0, memory 15.8 GiB, institution:aurora 1`."""

    def number(value: float) -> str:
        return f"{value:g}"

    parts = [f"CPU {number(resources.get('CPU', 0))}", f"GPU {number(resources.get('GPU', 0))}"]
    if "memory" in resources:
        parts.append(f"memory {resources['memory'] / 2**30:.1f} GiB")
    parts += [
        f"{k} {number(v)}" for k, v in sorted(resources.items()) if k.startswith("institution:")
    ]
    return ", ".join(parts)


@jobs_app.command("submit")
def jobs_submit(
    spec: Annotated[Path, typer.Argument(help="Job spec TOML file.")],
    coordinator: CoordinatorAddress = None,
    data_dir: DataDir = Path(".consortium"),
    watch: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = False,
) -> None:
    """Submit a job spec; prints the new job's id."""
    with cli_errors():
        try:
            text = spec.read_text()
        except OSError as error:
            from consortium.errors import JobSpecError

            raise JobSpecError(f"cannot read job spec {spec}: {error.strerror}") from None
        with connect(coordinator, data_dir) as remote:
            job = remote.submit(text)
            console.print(f"submitted job {job.job_id} ({job.name}), {job.rounds_total} rounds")
            if watch:
                _exit_for(watch_job(remote, job.job_id, console).state)


@jobs_app.command("list")
def jobs_list(
    coordinator: CoordinatorAddress = None, data_dir: DataDir = Path(".consortium")
) -> None:
    """List jobs, oldest first."""
    with cli_errors(), connect(coordinator, data_dir) as remote:
        table = Table("job", "name", "state", "rounds", "message")
        for job in remote.list_jobs():
            table.add_row(
                job.job_id,
                job.name,
                state_name(job.state),
                f"{job.rounds_completed}/{job.rounds_total}",
                job.message,
            )
        console.print(table)


@jobs_app.command("watch")
def jobs_watch(
    job_id: str, coordinator: CoordinatorAddress = None, data_dir: DataDir = Path(".consortium")
) -> None:
    """Follow a job live until it ends (exit code tells how it ended)."""
    with cli_errors(), connect(coordinator, data_dir) as remote:
        _exit_for(watch_job(remote, job_id, console).state)


@jobs_app.command("show")
def jobs_show(
    job_id: str, coordinator: CoordinatorAddress = None, data_dir: DataDir = Path(".consortium")
) -> None:
    """Show a job and its rounds."""
    with cli_errors(), connect(coordinator, data_dir) as remote:
        reply = remote.get(job_id)
        job = reply.job
        console.print(f"job {job.job_id} ({job.name}): {state_name(job.state)} - {job.message}")
        for record in reply.rounds:
            console.print("  " + describe_round(record))
        if job.model_path:
            console.print(f"model: {job.model_path}")


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: str, coordinator: CoordinatorAddress = None, data_dir: DataDir = Path(".consortium")
) -> None:
    """Cancel a queued or running job."""
    with cli_errors(), connect(coordinator, data_dir) as remote:
        job = remote.cancel(job_id)
        console.print(f"job {job.job_id} is {state_name(job.state)}")


@app.command("exit-codes")
def exit_codes() -> None:
    """Explain every exit code."""
    for code, text in EXIT_CODE_HELP.items():
        console.print(f"{int(code):>3}  {code.name.lower():<28} {text}")


@app.command()
def demo(
    work_dir: Annotated[Path, typer.Option(help="Where the demo keeps everything.")] = Path(
        ".consortium-demo"
    ),
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 6,
    institutions: Annotated[int, typer.Option(min=2, max=8)] = 3,
    job: Annotated[
        str,
        typer.Option(
            help="pipeline: pretrain at the sites (federated DiLoCo), then federated "
            "fine-tune; digits: the quick classification example."
        ),
    ] = "pipeline",
    outer_steps: Annotated[
        int | None,
        typer.Option(min=1, help="DiLoCo outer steps of the pretraining job (default 4)."),
    ] = None,
    inner_steps: Annotated[
        int | None,
        typer.Option(min=1, help="Inner steps per outer step of pretraining (default 30)."),
    ] = None,
    ray_pool: Annotated[
        bool,
        typer.Option(
            "--ray-pool",
            help="Pretrain on a Ray pool the sites join (one trust domain) instead of at "
            "the sites over the federated channel.",
        ),
    ] = False,
    wan: Annotated[
        bool,
        typer.Option(
            "--wan",
            help="Put the coordinator and each site in a network namespace of its own, "
            "behind an emulated WAN link (80 ms round trips, 100 Mbit/s, 0.1% loss; "
            "needs root).",
        ),
    ] = False,
    wan_testbed: Annotated[str | None, typer.Option(hidden=True)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """The whole thing on one machine: serve, 3 institutions onboard and join, then
    pretraining at their sites and federated fine-tuning on their private text."""
    from coordinator.demo import (
        INSTITUTION_NAMES,
        PRETRAIN_INNER_STEPS,
        PRETRAIN_OUTER_STEPS,
        run_demo,
    )

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwinds through the demo's cleanup

    signal.signal(signal.SIGTERM, on_sigterm)
    restrict_umask()  # the demo's consortium, like a real one: owner-only at rest
    configure_logging(verbose)
    with cli_errors():
        if job not in ("pipeline", "digits"):
            raise InvalidArgumentError(f"--job must be pipeline or digits, got {job!r}")
        if wan and wan_testbed is None:  # build the test bed, then run again inside it
            from coordinator.wan import run_behind_wan

            console.print("building the WAN test bed (network namespaces, shaped links)...")
            argv = [venv_executable("coordinator"), *sys.argv[1:]]
            raise typer.Exit(
                run_behind_wan(
                    INSTITUTION_NAMES[:institutions],
                    argv,
                    on_links=lambda links: console.print(f"links: {links}"),
                )
            )
        state = run_demo(
            work_dir,
            rounds=rounds,
            num_institutions=institutions,
            console=console,
            job_kind=job,
            outer_steps=outer_steps or PRETRAIN_OUTER_STEPS,
            inner_steps=inner_steps or PRETRAIN_INNER_STEPS,
            ray_pool=ray_pool,
            wan_testbed=wan_testbed,
        )
        _exit_for(state)


def _exit_for(state: int) -> None:
    from consortium.proto.v1 import jobs_pb2

    if state == jobs_pb2.JOB_STATE_FAILED:
        raise typer.Exit(int(ExitCode.JOB_FAILED))
    if state == jobs_pb2.JOB_STATE_CANCELLED:
        raise typer.Exit(int(ExitCode.JOB_CANCELLED))
