"""A dishonest coordinator's training messages against a site's ClientApp: what it may
name (the dataset, the model's options) is held to what the site offers and can bear."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.federated import client_app
from client.federated.task_runner import told_to_coordinator
from consortium.errors import TaskRefusedError
from consortium.model_wire import ARRAYS_RECORD, pack_tensors
from consortium.models import MAX_PARAMETERS, build_model, parameter_tensors
from consortium.workloads import WorkloadOptions, load_workload

SMALL = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32}
SUPERLINK_NODE_ID = 1


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the ServerApp runtime sets before messages can be built (restored after)."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


def _site(tmp_path: Path) -> tuple[Context, Path]:
    """A site offering one text dataset, `docstrings`; a private file of its user's
    lies beside its data dir, not in it."""
    data_dir = tmp_path / "data"
    (data_dir / "text").mkdir(parents=True)
    (data_dir / "text" / "docstrings.txt").write_bytes(b"shared docstrings\n" * 64)
    private = tmp_path / "private"
    private.mkdir()
    (private / "notes.txt").write_bytes(b"the site's private notes, never offered\n" * 64)
    context = Context(
        run_id=1,
        node_id=7,
        node_config={
            "institution": "site-a",
            "data-dir": str(data_dir),
            "device": "cpu",
            "workloads": "bytelm",
            "commitment-key": str(tmp_path / "state" / "commitment.key"),
            "state-dir": str(tmp_path / "state"),
        },
        state=RecordDict(),
        run_config={},
    )
    return context, private / "notes.txt"


def _message(
    dataset: str, message_type: str = "train", options: dict[str, int] | None = None
) -> Message:
    weights = parameter_tensors(build_model("bytelm", SMALL))
    config = ConfigRecord(
        {
            "workload": "bytelm",
            "dataset": dataset,
            "model-options": json.dumps(options or SMALL),
            "server-round": 1,
            "seed": 0,
            "local-steps": 1,
            "batch-size": 2,
            "seq-len": 16,
        }
    )
    content = RecordDict({ARRAYS_RECORD: pack_tensors(weights), "config": config})
    return Message(content=content, dst_node_id=7, message_type=message_type)


@pytest.mark.parametrize("entry", [client_app.train, client_app.local_evaluate])
def test_site_refuses_a_dataset_name_that_leads_out_of_its_data_dir(
    tmp_path: Path, entry: Callable[[Message, Context], Message]
) -> None:
    context, private = _site(tmp_path)
    client_app.TRAINER._enter(-1)  # nothing a previous test loaded
    read: list[str] = []
    original = client_app.TRAINER.data

    def spying(*args: object) -> object:
        read.append(str(args[-1]))
        return original(*args)  # type: ignore[arg-type]

    client_app.TRAINER.data = spying  # type: ignore[method-assign]
    try:
        for name in ("../../private/notes", str(private.with_suffix(""))):
            with pytest.raises(TaskRefusedError, match="offers no dataset"):
                entry(_message(name), context)
        assert read == []  # no loader ever saw the coordinator's path
        # The dataset the site offers still trains.
        reply = entry(_message("docstrings"), context)
        assert not reply.has_error() and read == ["docstrings"]
    finally:
        del client_app.TRAINER.data
        client_app.TRAINER._enter(-1)


@pytest.mark.parametrize("entry", [client_app.train, client_app.local_evaluate])
def test_site_refuses_model_options_over_max_parameters_before_building_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: Callable[[Message, Context], Message]
) -> None:
    context, _ = _site(tmp_path)
    client_app.TRAINER._enter(-1)
    workload = load_workload("bytelm")
    built: list[object] = []

    def recording(options: WorkloadOptions) -> object:
        # Recorded instead of built: 13e9 parameters would take the test's memory.
        built.append(options)
        raise MemoryError("the site would have built the coordinator's model")

    monkeypatch.setattr(workload, "build_model", recording)
    huge = {"n_layer": 64, "n_head": 2, "n_embd": 4096, "block_size": 32}
    assert workload.parameter_count(huge) > MAX_PARAMETERS
    try:
        with pytest.raises(TaskRefusedError, match="this site trains at most"):
            entry(_message("docstrings", options=huge), context)
        assert built == []
    finally:
        client_app.TRAINER._enter(-1)


def test_the_coordinator_hears_why_a_site_refused_but_never_its_data(tmp_path: Path) -> None:
    """A failure's text goes back to the coordinator (and into the round's signed
    record) only for a site's refusal; any other error is named by its type alone.
    The attack: the coordinator points an allowed workload at a dataset of another
    shape (a table of names), and numpy's error quotes the first value."""
    context, _ = _site(tmp_path)
    context.node_config["workloads"] = "bytelm,digits-cnn"
    data_dir = Path(str(context.node_config["data-dir"]))
    np.savez(data_dir / "records.npz", x=np.array([["Jane Roe", "1970-01-01"]]), y=np.array([0]))
    config = ConfigRecord(
        {"workload": "digits-cnn", "dataset": "records", "server-round": 1, "seed": 0}
    )
    weights = pack_tensors(parameter_tensors(build_model("digits-cnn", {})))
    message = Message(
        content=RecordDict({ARRAYS_RECORD: weights, "config": config}),
        dst_node_id=7,
        message_type="train",
    )
    client_app.TRAINER._enter(-1)
    try:
        with pytest.raises(Exception) as failed:
            client_app.train(message, context)
        assert "Jane Roe" in str(failed.value)  # what the site's own log keeps
        told = told_to_coordinator(failed.value)
        assert "Jane Roe" not in told and str(data_dir) not in told
        assert told.startswith(type(failed.value).__name__)

        with pytest.raises(TaskRefusedError) as refused:
            client_app.train(_message("elsewhere"), context)
        told = told_to_coordinator(refused.value)
        assert told == "TaskRefusedError: this site offers no dataset 'elsewhere'"
        assert "docstrings" not in told and "records" not in told  # what it does offer
    finally:
        client_app.TRAINER._enter(-1)


@pytest.mark.parametrize(
    ("batch_size", "seq_len", "expected"),
    [
        (65_536, 128, "a training step takes at most"),
        (10**9, 0, "at least 1"),
        (10**9, -1, "at least 1"),
    ],
)
def test_site_refuses_a_step_larger_than_it_trains_before_loading_anything(
    tmp_path: Path, batch_size: int, seq_len: int, expected: str
) -> None:
    """batch_size 65,536 of 128-byte windows: about 300 GiB of the default ByteLM's
    activations, which the OOM killer answered by ending `client join`."""
    context, _ = _site(tmp_path)
    client_app.TRAINER._enter(-1)
    message = _message("docstrings")
    config = message.content.config_records["config"]
    config["batch-size"], config["seq-len"] = batch_size, seq_len
    try:
        with pytest.raises(TaskRefusedError, match=expected):
            client_app.train(message, context)
    finally:
        client_app.TRAINER._enter(-1)
