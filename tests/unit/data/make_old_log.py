"""How `old_log.jsonl` was made: run once against commit 96792e9 (before typed records).

    git worktree add /tmp/old 96792e9
    cd /tmp/old && /work/main/.venv/bin/python /work/main/tests/unit/data/make_old_log.py OUT

It writes, with that commit's `ProvenanceLog.append` and its writers' exact field names,
a federated job (started, institution key, two rounds with a signed update and a
refusal, resumed, completed) and a pretraining job (started, outer step, resumed, outer
step, `job_finished`: the old name of its final record), a tree head after each as the
writers did, then OUT/old_log.jsonl and OUT/old_log.pub. The private keys are discarded.
Kept beside the log so the fixture's provenance is on record; not imported by tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

from consortium.provenance.environment import describe_environment
from consortium.provenance.log import ProvenanceLog
from consortium.provenance.signing import SigningKey, b64
from consortium.provenance.updates import UpdateStatement
from coordinator.federated.strategy import AggregationRule
from coordinator.jobs.spec import parse_job_spec, parse_submitted_spec

FEDERATED = (
    'name = "digits"\nmodel = "digits-cnn"\ndataset = "digits"\n'
    "rounds = 2\nmin_clients = 1\nseed = 7\n"
)
PRETRAIN = (
    'name = "tiny"\nkind = "pretrain"\nn_layer = 1\nn_head = 2\nn_embd = 16\n'
    "block_size = 32\nseq_len = 32\ninner_steps = 5\nouter_steps = 2\n"
)
FED_JOB, PRE_JOB = "fed-0001", "pre-0001"


def federated(log: ProvenanceLog, site: SigningKey) -> None:
    spec = parse_job_spec(FEDERATED)
    rule = AggregationRule(name=spec.aggregation, trim_fraction=spec.trim_fraction)
    log.append(
        "job_started",
        {
            "job_id": FED_JOB,
            "kind": "federated",
            "spec": spec.model_dump(mode="json"),
            "seed": spec.seed,
            "strategy": {"sampler": spec.strategy, **rule.describe()},
            "environment": describe_environment("cpu", deterministic=True),
            "model": {"name": spec.model, "options": dict(spec.model_options)},
            "init_from": None,
            "initial_model_digest": "a0" * 32,
        },
    )
    log.publish_tree_head()
    log.append(
        "institution_key",
        {"institution": "alpha", "key_id": site.key_id, "public_key": b64(site.public.raw)},
    )
    for round_ in (1, 2):
        if round_ == 2:
            log.append(
                "job_resumed", {"job_id": FED_JOB, "after_round": 1, "model_digest": "e1" * 32}
            )
        statement = UpdateStatement(
            job_id=FED_JOB,
            round=round_,
            # Each round starts from the model the one before ended with.
            global_digest="a0" * 32 if round_ == 1 else f"e{round_ - 1}" * 32,
            update_digest=f"c{round_}" * 32,
            num_examples=17,
            commitment="d0" * 32,
            nonce=f"nonce-{round_}",
            institution="alpha",
        )
        accepted = {
            "institution": "alpha",
            "node_id": "101",
            "key_id": site.key_id,
            "update_digest": statement.update_digest,
            "num_examples": statement.num_examples,
            "commitment": statement.commitment,
            "data": {"count": 17, "dataset": "digits"},
            "nonce": statement.nonce,
            "signature": b64(site.sign(statement.to_bytes())),
            "accepted": True,
            "reason": "",
        }
        refused = {
            "institution": "",
            "node_id": "202",
            "accepted": False,
            "reason": "unsigned",
            "detail": "no signature record",
        }
        log.append(
            "round",
            {
                "job_id": FED_JOB,
                "round": round_,
                "global_digest": statement.global_digest,
                "participants": ["alpha"],
                "updates": [refused, accepted],
                "aggregation": rule.describe(),
                "aggregate_digest": f"e{round_}" * 32,
                "metrics": {"accuracy": 0.5 + round_ / 10, "loss": 1.25},
            },
        )
        log.publish_tree_head()
    log.append(
        "job_completed",
        {
            "job_id": FED_JOB,
            "rounds": 2,
            "final_model_digest": "e2" * 32,
            "model_file": f"{FED_JOB}.safetensors",
            "model_file_sha256": "f1" * 32,
        },
    )
    log.publish_tree_head()


def pretraining(log: ProvenanceLog) -> None:
    spec = parse_submitted_spec(PRETRAIN)
    log.append(
        "job_started",
        {
            "job_id": PRE_JOB,
            "kind": "pretrain",
            "spec": spec.model_dump(mode="json"),
            "spec_digest": spec.digest(),  # type: ignore[union-attr]
            "seed": spec.seed,
            "environment": describe_environment("cpu", True),
        },
    )
    log.publish_tree_head()
    for step in (0, 1):
        if step == 1:
            log.append("job_resumed", {"job_id": PRE_JOB, "after_round": 1, "kind": "pretrain"})
            log.publish_tree_head()
        log.append(
            "outer_step",
            {
                "job_id": PRE_JOB,
                "round": step + 1,
                "step": step,
                "workers": [
                    {
                        "worker": "alpha/0a1b2c3d/cpu0",
                        "institution": "alpha",
                        "node_id": "0a1b2c3d",
                        "device": "cpu",
                        "position": 0,
                        "shard_ids": [step, step + 2],
                        "seed": 1000 + step,
                        "pseudo_gradient_digest": f"9{step}" * 32,
                        "inner_steps": 5,
                        "tokens": 5 * 32 * 4,
                        "compute_s": 0.75,
                    }
                ],
                "workers_lost": {"beta/11223344/cpu0": "timed out"} if step else {},
                "step_seed": 424242 + step,
                "aggregate_digest": f"8{step}" * 32,
                "model_digest": f"7{step}" * 32,
                "val_loss": 5.5 - step,
                "attempts": 1,
            },
        )
        log.publish_tree_head()
    log.append(
        "job_finished",
        {
            "job_id": PRE_JOB,
            "kind": "pretrain",
            "model_digest": "71" * 32,
            "corpus_digest": "60" * 32,
            "val_loss": 4.5,
        },
    )
    log.publish_tree_head()


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    coordinator = SigningKey.generate()
    log = ProvenanceLog(out / "old_log.jsonl", coordinator)
    federated(log, SigningKey.generate())
    pretraining(log)
    (out / "old_log.pub").write_bytes(coordinator.public.pem())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
