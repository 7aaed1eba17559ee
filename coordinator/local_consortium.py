"""A whole consortium on one machine, as real processes: `LocalConsortium`.

`coordinator demo` and the integration tests bring a consortium up the same way, so
they share this one harness::

    with LocalConsortium(work_dir) as consortium:
        consortium.init()                       # coordinator init (PKI, signing key)
        address = consortium.serve()            # coordinator serve, once ready
        bundle = consortium.onboard("alpha")    # client keygen + coordinator onboard
        consortium.wait_for_supernode_keys()    # the SuperLink accepts the sites' keys
        consortium.join("alpha", data_dir)      # client join --bundle
        with consortium.connect() as remote: ...
    # every process it started is stopped here, also on failure or Ctrl-C

Layout under `work_dir` (the first two can be put elsewhere): ``coordinator/`` (the
coordinator's data dir), ``institutions/<name>/`` (``state/`` holds the site's keys,
``bundle/`` its startup bundle), ``logs/`` (one log per child).

Children are started through a `Launcher`; by default the harness keeps them itself.
Tests pass their own launcher, which also records descendants to prove that nothing
outlives a stop. `env` reaches every child: tests use it for a fast settings profile
(CONSORTIUM_COORDINATOR_* / CONSORTIUM_CLIENT_* variables), never monkeypatching.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

from consortium.errors import ChildProcessFailedError
from consortium.processes import ChildProcess, stop_processes, venv_executable
from consortium.proto.v1 import nodes_pb2
from consortium.site_keys import create_site_keys
from coordinator.access.onboarding import Request, init_consortium, onboard
from coordinator.cli.remote import Remote, connect
from coordinator.data_dir import DataDir
from coordinator.state import SqliteStateStore

START_TIMEOUT_S = 120.0
WAIT_POLL_S = 0.1
CERT_DAYS = 30
LOOPBACK_NAMES = ("localhost", "127.0.0.1")


class Launcher(Protocol):
    """Starts a console script of this venv as a child; stops all of them later."""

    def start(
        self, name: str, *argv: str, env: Mapping[str, str] | None = None
    ) -> ChildProcess: ...

    def stop_all(self) -> None: ...


class OwnChildren:
    """The default launcher: keeps its children and stops them, clients first."""

    def __init__(self, log_dir: Path, namespaces: Mapping[str, str] | None = None) -> None:
        """``namespaces``: child name -> the network namespace it runs in (``ip netns
        exec``; `coordinator/wan.py` puts each site behind its own WAN link); the rest
        run in this process's."""
        self.log_dir = log_dir
        self.namespaces = dict(namespaces or {})
        self.children: list[ChildProcess] = []

    def start(self, name: str, *argv: str, env: Mapping[str, str] | None = None) -> ChildProcess:
        command = [venv_executable(argv[0]), *argv[1:]]
        namespace = self.namespaces.get(name)
        if namespace is not None:  # `ip netns exec` execs the command: same pid to stop
            command = ["ip", "netns", "exec", namespace, *command]
        child = ChildProcess(name, command, self.log_dir / f"{name}.log", env)
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        # Later children (clients) leave first and in parallel, so the coordinator sees
        # them go; then the rest (the coordinator), also in parallel.
        later, first = self.children[1:], self.children[:1]
        stop_processes(later)
        stop_processes(first)


class LocalConsortium:
    """Init, serve, onboard, join and teardown of a consortium on loopback."""

    def __init__(
        self,
        work_dir: Path,
        *,
        secure: bool = True,
        ray: bool = True,
        env: Mapping[str, str] | None = None,
        launcher: Launcher | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        data_dir: Path | None = None,
        sites_dir: Path | None = None,
        server_names: Sequence[str] = (),
    ) -> None:
        """``server_names``: hosts the server certificate names besides loopback (the
        coordinator's address on a test bed)."""
        self.work_dir = work_dir
        self.secure = secure
        self.ray = ray
        self.env = dict(env or {})
        self.launcher: Launcher = launcher or OwnChildren(work_dir / "logs")
        self.start_timeout_s = start_timeout_s
        self.data_dir = data_dir or work_dir / "coordinator"
        self.sites_dir = sites_dir or work_dir / "institutions"
        self.children: list[ChildProcess] = []
        self.address = ""
        self.server_names = [*LOOPBACK_NAMES, *server_names]

    # --- context manager: always stop what was started ----------------------
    def __enter__(self) -> LocalConsortium:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every process started through this harness's launcher."""
        self.launcher.stop_all()

    # --- paths ---------------------------------------------------------------
    @property
    def paths(self) -> DataDir:
        return DataDir(self.data_dir)

    def site_dir(self, name: str) -> Path:
        return self.sites_dir / name

    def state_dir(self, name: str) -> Path:
        return self.site_dir(name) / "state"

    def bundle_dir(self, name: str) -> Path:
        return self.site_dir(name) / "bundle"

    # --- steps ---------------------------------------------------------------
    def init(self) -> None:
        """`coordinator init`: root CA, certificates, signing key, Ray token."""
        init_consortium(self.data_dir, self.server_names, cert_days=CERT_DAYS)

    def start(self, name: str, *argv: str, env: Mapping[str, str] | None = None) -> ChildProcess:
        """Any console script of this venv as a child, with the harness's env."""
        child = self.launcher.start(name, *argv, env={**self.env, **(env or {})})
        self.children.append(child)
        return child

    def serve(self, name: str = "coordinator", flags: Sequence[str] = ()) -> str:
        """`coordinator serve` (mutual TLS after `init`, else --insecure on loopback;
        --no-ray unless Ray was asked for) plus `flags`; returns the API address once
        the coordinator wrote it (it writes it last, when ready)."""
        address_file = self.paths.address_file
        address_file.unlink(missing_ok=True)  # a restart: wait for the new address
        argv = ["coordinator", "serve", "--data-dir", str(self.data_dir)]
        if not self.secure:
            argv.append("--insecure")
        if not self.ray:
            argv.append("--no-ray")
        child = self.start(name, *argv, *flags)
        self.wait(f"the coordinator ({name})", address_file.exists, [child])
        self.address = address_file.read_text().strip()
        return self.address

    def onboard(self, name: str) -> Path:
        """`client keygen` at the site (its key stays there), then `coordinator onboard
        --request` at the operator; returns the site's startup bundle dir."""
        keys = create_site_keys(self.state_dir(name), name)
        store = SqliteStateStore(self.paths.state_db)
        try:
            return onboard(
                self.data_dir,
                store,
                name,
                Request.from_dir(keys.request_dir),
                self.bundle_dir(name),
                self.address,
                cert_days=CERT_DAYS,
            )
        finally:
            store.close()

    def supernode_keys_registered(self) -> bool:
        """Whether the SuperLink has accepted every onboarded site's SuperNode key."""
        return supernode_keys_registered(self.data_dir)

    def wait_for_supernode_keys(self) -> None:
        self.wait(
            "the SuperLink to accept the onboarded SuperNode keys",
            self.supernode_keys_registered,
        )

    def join(
        self,
        name: str,
        data: Path,
        *,
        child_name: str | None = None,
        flags: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> ChildProcess:
        """`client join` for institution `name` on its `data`: with its bundle when
        secure, else --insecure to this coordinator; --ray (the site joins the Ray pool) when
        Ray was asked for, else --no-ray."""
        if self.secure:
            credentials = ["--bundle", str(self.bundle_dir(name))]
        else:
            credentials = ["--insecure", "--coordinator", self.address, "--institution", name]
        argv = ["client", "join", *credentials, "--data", str(data)]
        argv += ["--state-dir", str(self.state_dir(name))]
        argv.append("--ray" if self.ray else "--no-ray")
        return self.start(child_name or f"client-{name}", *argv, *flags, env=env)

    def connect(self) -> Remote:
        """A control-plane client (the operator's certificate when secure)."""
        return connect(self.address, self.data_dir)

    def wait_for_online(self, count: int) -> None:
        """Until at least `count` nodes are online in the registry."""
        with self.connect() as remote:
            self.wait(
                f"{count} institutions to join",
                lambda: online_nodes(remote.list_nodes()) >= count,
            )

    def wait(
        self,
        what: str,
        ready: Callable[[], bool],
        children: Sequence[ChildProcess] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Poll `ready` until true; fail early, with the log tail, when one of
        `children` (default: all started here) exits meanwhile."""
        watched = self.children if children is None else children
        wait_until(what, ready, watched, timeout_s or self.start_timeout_s)


def online_nodes(nodes: Sequence[nodes_pb2.Node]) -> int:
    return sum(node.state == nodes_pb2.NODE_STATE_ONLINE for node in nodes)


def supernode_keys_registered(coordinator_dir: Path) -> bool:
    store = SqliteStateStore(DataDir(coordinator_dir).state_db)
    try:
        return all(node_id for _, _, node_id in store.supernode_keys())
    finally:
        store.close()


def wait_until(
    what: str,
    ready: Callable[[], bool],
    children: Sequence[ChildProcess],
    timeout_s: float = START_TIMEOUT_S,
) -> None:
    """Poll `ready` until true; fail early, with the log tail, if a child died."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        for child in children:
            code = child.poll()
            if code is not None:
                raise ChildProcessFailedError(
                    f"{child.name} exited with code {code} while waiting for {what}; "
                    f"see {child.log_path}:\n{child.log_tail(40)}"
                )
        if time.monotonic() > deadline:
            raise ChildProcessFailedError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(WAIT_POLL_S)
