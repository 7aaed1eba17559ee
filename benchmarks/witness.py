"""Benchmark: what witnessing the log adds to a federated round, per round and per site.

    python benchmarks/witness.py [--records 100 1000 3000] [--sites 3] [--repeats 5]

For each log size it builds a real log (`ProvenanceLog`: records, a tree head after each
round, three bound institution keys; the writer reads the whole log on every append, so
a large one takes a while to build), then times, side by side in one run (best of
``--repeats``, wall clock):

* coordinator, once per round: reading the log into a `LogView` (its Merkle tree) and
  building each site's request (head line + consistency proofs);
* site, once per round: `witness_head` (parse and check the head's signature, verify the
  consistency proof, append to its record with fsync, cosign);
* coordinator, per reply: checking the cosignature; and appending the round's
  cosignature lines;
* `verify_log` of the whole log with and without the cosignature lines.

It prints the bytes a request and a cosignature add to a round's message, next to the
bytes of the two models the project trains (digits-cnn and the demo's bytelm), and
the ratio of each cost to a round's training time measured on this machine
(``--round-s``, default 10 s: the digits job's measured round on 2 cores, docs/operations.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from consortium import pki
from consortium.models import build_model, parameter_tensors
from consortium.provenance.binding import sign_binding
from consortium.provenance.log import ProvenanceLog
from consortium.provenance.records import InstitutionKey, JobStarted, KeyBinding, Round
from consortium.provenance.signing import SigningKey, b64
from consortium.provenance.verify import verify_log
from consortium.provenance.witness import cosignature_fields, witness_head
from coordinator.provenance.witnessing import LogView, WitnessedHead, check_cosignature

MODEL = "00" * 32


def best(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def model_bytes(name: str) -> int:
    model = build_model(name, {})
    return sum(t.numel() * t.element_size() for t in parameter_tensors(model).values())


def build_log(
    root: Path, records: int, sites: list[str]
) -> tuple[ProvenanceLog, SigningKey, dict[str, SigningKey]]:
    key = SigningKey.generate()
    log = ProvenanceLog(root / "log.jsonl", key)
    ca_key = pki.generate_key()
    ca = pki.create_ca(ca_key)
    site_keys = {name: SigningKey.generate() for name in sites}
    for name, site_key in site_keys.items():
        tls_key = pki.generate_key()  # as `client keygen` and `coordinator onboard` do
        cert = pki.sign_csr(ca_key, ca, pki.make_csr(tls_key, name), name, 30)
        binding = KeyBinding(
            certificate=pki.pem(cert).decode(),
            signature=b64(sign_binding(tls_key, name, site_key.public)),
        )
        log.append_record(
            InstitutionKey(
                institution=name,
                key_id=site_key.key_id,
                public_key=b64(site_key.public.raw),
                binding=binding,
            )
        )
    log.append_record(JobStarted(job_id="bench", kind="federated", initial_model_digest=MODEL))
    log.publish_tree_head()
    for round_ in range(1, records - len(sites)):
        log.append_record(
            Round(job_id="bench", round=round_, global_digest=MODEL, aggregate_digest="")
        )
        log.publish_tree_head()
    return log, key, site_keys


def measure(records: int, sites: list[str], repeats: int, round_s: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        log, key, site_keys = build_log(root, records, sites)
        # Every site cosigned the previous head, and the log shows it (the steady state);
        # the round asks for the latest one.
        view = LogView.read(log.path)
        for name in sites:
            previous = view.head_lines[-2].decode()
            cosigned = witness_head(root / name, name, site_keys[name], key.public, previous, {})
            log.append_cosignatures([cosigned])
        view = LogView.read(log.path)
        view_s = best(repeats, lambda: LogView.read(log.path))
        requests_s = best(repeats, lambda: [view.request_for(name) for name in sites])
        request = view.request_for(sites[0])
        assert request is not None
        request_bytes = len(request.head_line) + len(request.proofs_json())
        # A site that has no cosignature in the log gets proofs from the newest heads.
        absent = view.request_for("never-cosigned")
        assert absent is not None
        absent_bytes = len(absent.head_line) + len(absent.proofs_json())

        def site_round() -> object:
            return witness_head(
                root / sites[0],
                sites[0],
                site_keys[sites[0]],
                key.public,
                request.head_line,
                request.proofs,
            )

        # The first time a site sees a head it appends it to its record (with fsync);
        # a round sent again (same head) only checks and cosigns.
        site_first_s = best(1, site_round)
        site_s = best(repeats, site_round)
        cosignature = site_round()
        fields = {**cosignature_fields(cosignature), "institution": sites[0]}
        cosignature_bytes = len(json.dumps(fields))
        head = WitnessedHead(request.tree_size, request.root_hash, key.key_id)
        keys = {site_keys[sites[0]].key_id: site_keys[sites[0]].public.raw}
        check_s = best(repeats, lambda: check_cosignature(dict(fields), sites[0], keys, head))
        plain = root / "plain.jsonl"
        plain.write_bytes(log.path.read_bytes())
        checked = check_cosignature(dict(fields), sites[0], keys, head)
        append_s = best(1, lambda: log.append_cosignatures([checked] * len(sites)))
        verify_plain_s = best(repeats, lambda: verify_log(plain, key.public))
        verify_s = best(repeats, lambda: verify_log(log.path, key.public))
    coordinator_s = view_s + requests_s + len(sites) * check_s + append_s
    print(f"\nlog of {records} records, {len(view.head_lines)} tree heads, {len(sites)} sites")
    rows = [
        ("coordinator: read log + tree", view_s),
        (f"coordinator: {len(sites)} requests (proofs)", requests_s),
        ("coordinator: check 1 cosignature", check_s),
        (f"coordinator: append {len(sites)} cosignatures", append_s),
        ("coordinator: total per round", coordinator_s),
        ("site: check head + proof, record, cosign", site_first_s),
        ("site: the same head again (no append)", site_s),
        ("verify_log without cosignatures", verify_plain_s),
        ("verify_log with them", verify_s),
    ]
    for what, seconds in rows:
        print(f"  {what:44s} {seconds * 1000:9.2f} ms   {seconds / round_s:8.5f} of a round")
    print(f"  verify with / without cosignatures: {verify_s / verify_plain_s:.2f}x")
    print(f"  request of a site with no logged cosignature: {absent_bytes} B")
    for name in ("digits-cnn", "bytelm"):
        size = model_bytes(name)
        print(
            f"  request {request_bytes} B + cosignature {cosignature_bytes} B per site: "
            f"{(request_bytes + cosignature_bytes) / (2 * size):.5f} of a {name} round trip "
            f"({2 * size} B)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, nargs="+", default=[100, 1000, 3000])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--round-s", type=float, default=10.0)
    args = parser.parse_args()
    sites = [f"site-{i}" for i in range(args.sites)]
    for records in args.records:
        measure(records, sites, args.repeats, args.round_s)


if __name__ == "__main__":
    main()
