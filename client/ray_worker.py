"""This node's contribution to the coordinator's Ray cluster (pretraining).

`client join` starts `ray start --address <coordinator's Ray head> --block` as a child
in its own process group and stops that group when it exits (never `ray stop`, which
would stop every Ray process on the machine). The node announces the custom resource
``institution:<name>`` (the pretraining scheduler places one worker per GPU, or per CPU
without one, on nodes that announce it) and labels naming the institution and node.
With a startup bundle, Ray authenticates with the bundle's token. Where `client join`
runs as root, the node runs as the pool user in a sandbox that hides the site's state,
bundle and data (`pool_sandbox`, consortium/sandbox.py): any pool member's code runs on it.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from consortium.errors import UnreachableError
from consortium.leftovers import owner_env
from consortium.net import is_loopback_host, local_address_towards, split_host_port
from consortium.processes import STOP_TIMEOUT_S, ChildProcess, venv_executable
from consortium.ray_env import (
    CLAIM_LABEL,
    DRAIN_TIMEOUT_ENV,
    RayTls,
    log_end,
    prepare_ray_temp_dir,
    ray_auth_env,
    ray_node_ip,
    ray_port_flags,
    ray_started,
    ray_temp_dir,
    remove_ray_temp_dir,
    share_ray_credentials,
    short_temp_dir,
)
from consortium.sandbox import Sandbox, sandbox_for

log = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT_S = 5.0
# How long a `ray start` that has not started yet gets to end on SIGTERM before SIGKILL.
UNSTARTED_STOP_S = 2.0

# Ray label values: at most 63 characters, alphanumerics with -_. inside.
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def node_ip(ray_address: str) -> str:
    """The address this node announces to a head at `ray_address`, and that its Ray TLS
    certificate names: this machine's address on the route to the head (for a loopback
    head, the one Ray puts in place of 127.0.0.1)."""
    host, port = split_host_port(ray_address)
    if is_loopback_host(host):
        return ray_node_ip()
    try:
        return local_address_towards(host, port)
    except OSError as error:
        raise UnreachableError(
            f"this machine has no route to the coordinator's Ray head at {ray_address}: "
            f"{error.strerror or error}"
        ) from None


def worker_argv(
    ray_address: str,
    institution: str,
    node_id: str,
    gpu: int | None,
    temp_dir: Path,
    hardware: dict[str, str] | None = None,
    port_range: str | None = None,
    claim: str | None = None,
) -> list[str]:
    """The `ray start` command line of a contributed node; `hardware` adds labels such
    as ``memory``, ``gpu-model`` and ``gpu-memory`` (`client.devices.hardware_labels`);
    `port_range` ("LOW-HIGH") keeps every port the node listens on within it; `claim`
    is the coordinator's claim for this start (its ``consortium-claim`` label: the
    coordinator counts the node for the institution it issued the claim to, while the
    ``institution`` label and resource are what the node says, for display)."""
    argv = [
        venv_executable("consortium-ray"),
        "start",
        "--address",
        ray_address,
        "--num-cpus",
        "1",
        "--num-gpus",
        "1" if gpu is not None else "0",
        "--resources",
        json.dumps({f"institution:{institution}": 1}),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
        # Ray's log monitor publishes every worker's output through the GCS to any
        # driver of the cluster (any member holding the token); a site's logs stay at
        # the site, and the node saves a process.
        "--include-log-monitor",
        "false",
        "--block",
        *ray_port_flags(port_range, head=False),
    ]
    host, _ = split_host_port(ray_address)
    # Ray's own guess routes towards a public address, which a site on a private
    # network may not have; loopback is reachable from a loopback head.
    argv += ["--node-ip-address", "127.0.0.1" if is_loopback_host(host) else node_ip(ray_address)]
    labels = {"institution": institution, "node": node_id[:12]}
    valid = {k: v for k, v in labels.items() if _LABEL_VALUE.match(v)}
    for key in labels.keys() - valid.keys():
        log.warning("%s %r is not a valid Ray label value; not labelling it", key, labels[key])
    valid.update({k: v for k, v in (hardware or {}).items() if _LABEL_VALUE.match(v)})
    if claim is not None:
        if not _LABEL_VALUE.match(claim):
            raise ValueError(f"the coordinator's node claim {claim!r} is not a Ray label value")
        valid[CLAIM_LABEL] = claim
    if valid:
        argv += ["--labels", ",".join(f"{k}={v}" for k, v in valid.items())]
    return argv


def pool_sandbox(state_dir: Path, private: Sequence[Path]) -> Sandbox | None:
    """Where `client join` runs as root: the sandbox its Ray node runs in, as the pool
    user, with the state dir and the `private` paths (the site's data, its bundle) out
    of sight (consortium/sandbox.py). None otherwise: the node then runs as this user."""
    return sandbox_for(short_temp_dir(state_dir), (state_dir, *private))


class RayWorker:
    """A running `ray start --block` that contributes this node to the cluster; with a
    `sandbox`, as its user, which reads only the copies of the token and Ray TLS files
    handed to it."""

    def __init__(
        self,
        ray_address: str,
        institution: str,
        node_id: str,
        gpu: int | None,
        state_dir: Path,
        token_path: Path | None,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        hardware: dict[str, str] | None = None,
        tls: RayTls | None = None,
        before_start: Callable[[], str | None] | None = None,
        port_range: str | None = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        self._state_dir = state_dir
        self._sandbox = sandbox
        self._token_path = token_path
        self._tls = tls
        self._argv = functools.partial(
            worker_argv,
            ray_address,
            institution,
            node_id,
            gpu,
            ray_temp_dir(state_dir),
            hardware,
            port_range,
        )
        self._env = {**ray_auth_env(token_path, tls), **owner_env(state_dir)}
        # Leaving drains the node: on SIGTERM Ray marks it DRAINING (nothing new is
        # placed here; the pretraining controller drops its worker) and waits this long
        # for running work before ending its processes.
        self._drain_timeout_s = drain_timeout_s
        self._env[DRAIN_TIMEOUT_ENV] = str(drain_timeout_s)
        if gpu is not None:
            self._env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        self._log_path = state_dir / "logs" / "ray-worker.log"
        self.address = ray_address
        # Run before every start: `client join` fetches the cluster's current token
        # (it changes when an institution is revoked) and a fresh claim for the node.
        self._before_start = before_start or (lambda: None)
        self._log_offset = 0
        self.process = self._start(self._before_start())

    def _start(self, claim: str | None) -> ChildProcess:
        argv = self._argv(claim=claim)
        # Afresh and private to this user (Ray makes its own dirs world-writable); the
        # node's previous processes are gone (`restart` stops them first).
        prepare_ray_temp_dir(self._state_dir)
        env = self._env
        if self._sandbox is not None:
            # The pool user's from here on; the token is read after `before_start`
            # fetched the current one.
            self._sandbox.prepare()
            shared = share_ray_credentials(self._sandbox, self._token_path, self._tls)
            env = {**env, **ray_auth_env(*shared), **self._sandbox.env()}
            argv = self._sandbox.wrap(argv)
        # The log is appended to across restarts; "started" is read from here on.
        self._log_offset = log_end(self._log_path)
        cgroup = self._sandbox.cgroup if self._sandbox is not None else None
        return ChildProcess("ray-worker", argv, self._log_path, env=env, cgroup=cgroup)

    @property
    def started(self) -> bool:
        """Whether this start's `ray start` reported its node running. Before that it
        does not act on SIGTERM (measured: a stop then waited out its whole timeout,
        11 s with a 1 s drain), and its node runs nothing to drain."""
        return ray_started(self._log_path, self._log_offset)

    def _stop_process(self) -> None:
        timeout_s = self._drain_timeout_s + STOP_TIMEOUT_S if self.started else UNSTARTED_STOP_S
        self.process.stop(timeout_s=timeout_s)

    def restart(self) -> None:
        """Join again (say, the coordinator restarted its head, maybe with a new token):
        fetch the current token first; if the coordinator refuses it (this institution
        was revoked), raise, and the supervisor tries again after its backoff."""
        claim = self._before_start()
        self._stop_process()
        self.process = self._start(claim)

    def stop(self) -> None:
        self._stop_process()
        remove_ray_temp_dir(self._state_dir)
