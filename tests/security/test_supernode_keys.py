"""Attack: an outsider uses Flower's Control API (reachable by anyone who reaches the
SuperLink) to add its own SuperNode key and to unregister an institution's node. The
coordinator undoes both within a few checks, and logs and counts each change."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path

from consortium import pki
from consortium.processes import venv_executable
from coordinator.data_dir import DataDir
from coordinator.federated.flower_app import SUPERLINK_NAME
from coordinator.local_consortium import LocalConsortium
from coordinator.state import SqliteStateStore
from tests.conftest import Processes
from tests.helpers import START_TIMEOUT_S, TEST_PROFILE, wait_for

# How often the coordinator checks the SuperLink's nodes (flower_status_interval_s).
CHECK_INTERVAL_S = 1.0
UNDO_TIMEOUT_S = 60.0


def flwr(paths: DataDir, *args: str) -> dict[str, object]:
    """The real `flwr` CLI against the coordinator's SuperLink, with the coordinator's
    own FLWR_HOME (what anyone on the SuperLink's host can write for themselves)."""
    done = subprocess.run(
        [venv_executable("flwr"), *args, "--format", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, "FLWR_HOME": str(paths.flower_home)},
        timeout=120,
        check=False,
    )
    result: dict[str, object] = json.loads(done.stdout)
    assert result.get("success"), result
    return result


def node_status(paths: DataDir) -> dict[str, str]:
    nodes = flwr(paths, "supernode", "list", SUPERLINK_NAME)["nodes"]
    assert isinstance(nodes, list)
    return {str(node["node-id"]): str(node["status"]) for node in nodes}


def node_id_of(paths: DataDir, institution: str) -> str:
    store = SqliteStateStore(paths.state_db)
    try:
        return next(n for inst, _, n in store.supernode_keys() if inst == institution)
    finally:
        store.close()


def key_changes(paths: DataDir) -> dict[str, float]:
    address = paths.metrics_address_file.read_text().strip()
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = r'^consortium_supernode_key_changes_total\{action="(\w+)"\} (\S+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


def test_outsider_key_is_removed_and_unregistered_institution_restored(
    processes: Processes, tmp_path: Path
) -> None:
    consortium = LocalConsortium(
        tmp_path,
        ray=False,
        env={
            **TEST_PROFILE,
            "CONSORTIUM_COORDINATOR_FLOWER_STATUS_INTERVAL_S": str(CHECK_INTERVAL_S),
        },
        launcher=processes,
        start_timeout_s=START_TIMEOUT_S,
    )
    consortium.init()
    consortium.serve()
    for name in ("alpha", "beta"):
        consortium.onboard(name)
    consortium.wait_for_supernode_keys()
    paths = consortium.paths
    beta_node = node_id_of(paths, "beta")

    outsider_key = tmp_path / "outsider.pub"
    outsider_key.write_bytes(pki.openssh_public_key(pki.generate_key()))
    registered = flwr(paths, "supernode", "register", str(outsider_key), SUPERLINK_NAME)
    outsider_node = str(registered["node-id"])
    flwr(paths, "supernode", "unregister", beta_node, SUPERLINK_NAME)

    def undone() -> bool:
        status = node_status(paths)
        restored = node_id_of(paths, "beta")
        return (
            status.get(outsider_node) == "unregistered"
            and restored != beta_node
            and status.get(restored) == "registered"
        )

    wait_for("the coordinator to undo both changes", undone, UNDO_TIMEOUT_S)
    wait_for(
        "both changes counted",
        lambda: (
            key_changes(paths).get("removed_unknown", 0) >= 1
            and key_changes(paths).get("restored", 0) >= 1
        ),
    )
    assert key_changes(paths).get("removed_revoked") == 0
    log = (processes.log_dir / "coordinator.log").read_text()
    assert f"unregistered SuperNode {outsider_node} at the SuperLink" in log
    assert "restored the SuperNode key of beta" in log
    assert f"node {beta_node} was gone" in log
