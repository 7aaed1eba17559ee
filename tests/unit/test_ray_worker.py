"""The `ray start` command line a contributed node runs."""

from __future__ import annotations

import json
from pathlib import Path

from client.devices import hardware_labels, label_value
from client.ray_worker import worker_argv


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_worker_announces_institution_resource_and_labels_on_cpu() -> None:
    argv = worker_argv("127.0.0.1:6379", "aurora", "0123456789abcdef", None, Path("/tmp/r"))
    assert argv[1:3] == ["start", "--address"] and "--block" in argv
    assert json.loads(flag(argv, "--resources")) == {"institution:aurora": 1}
    assert flag(argv, "--labels") == "institution=aurora,node=0123456789ab"
    assert (flag(argv, "--num-cpus"), flag(argv, "--num-gpus")) == ("1", "0")
    assert flag(argv, "--node-ip-address") == "127.0.0.1"


def test_worker_contributes_one_gpu_when_given_one() -> None:
    argv = worker_argv("10.0.0.5:6379", "aurora", "n1", 0, Path("/tmp/r"))
    assert flag(argv, "--num-gpus") == "1"
    assert "--node-ip-address" not in argv


def test_worker_skips_label_for_institution_name_ray_refuses() -> None:
    argv = worker_argv("127.0.0.1:6379", "st olaf/hospital", "n1", None, Path("/tmp/r"))
    assert flag(argv, "--labels") == "node=n1"
    assert json.loads(flag(argv, "--resources")) == {"institution:st olaf/hospital": 1}


def test_worker_labels_its_hardware() -> None:
    hardware = {"memory": "24GiB", "gpu-model": "NVIDIA-H100-80GB-HBM3", "gpu-memory": "80GiB"}
    argv = worker_argv("127.0.0.1:6379", "aurora", "n1", 0, Path("/tmp/r"), hardware)
    assert flag(argv, "--labels") == (
        "institution=aurora,node=n1,memory=24GiB,gpu-model=NVIDIA-H100-80GB-HBM3,gpu-memory=80GiB"
    )


def test_cpu_node_labels_its_memory_and_no_gpu() -> None:
    labels = hardware_labels("cpu")
    assert set(labels) == {"memory"}
    assert labels["memory"].endswith("GiB") and int(labels["memory"][:-3]) > 0


def test_gpu_names_become_validlabel_values() -> None:
    assert label_value("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert label_value("Tesla T4 (rev. a1) ") == "Tesla-T4-rev.-a1"
    assert label_value("***") == "unknown"
