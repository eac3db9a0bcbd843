"""A real deployment on loopback: a SuperLink, one SuperNode per site, `flwr run`; tiny models.

The merge must equal `gramfuse merge` on the same folders; sites that error, do not fit, require secure mode or
vanish mid-round are named by node id and left out while min-owners holds; below it the run fails and writes
nothing."""

import json
import os
import signal
import threading
import time

import pytest
import torch
from helpers import perturbed, save_owner, tiny_model, write_data
from safetensors.torch import load_file

from federation.audit import recorded_arrays, revealing
from fusion.cli import main as gramfuse
from fusion.statistics import STATS_FILENAME, load_statistics
from server.processes import Loopback

GOOD = ("good0", "good1", "good2")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("loopback")
    base = tiny_model("bert")
    sites = {}
    for i, name in enumerate(GOOD):
        sites[name] = (save_owner(perturbed(base, seed=20 + i), root / name / "model"),
                       write_data(root / name / "data.jsonl", 40, seed=i))
    sites["broken"] = (save_owner(perturbed(base, seed=30), root / "broken" / "model"), root / "broken" / "gone.jsonl")
    sites["alien"] = (save_owner(tiny_model("distilbert"), root / "alien" / "model"),
                      write_data(root / "alien" / "data.jsonl", 40, seed=9))
    three_labels = tiny_model("bert", num_labels=3)
    three_labels.bert.load_state_dict(perturbed(base, seed=31).bert.state_dict())
    sites["topics"] = (save_owner(three_labels, root / "topics" / "model"),
                       write_data(root / "topics" / "data.jsonl", 40, seed=8, num_labels=3))
    sites["guarded"] = (save_owner(perturbed(base, seed=32), root / "guarded" / "model"),
                        write_data(root / "guarded" / "data.jsonl", 40, seed=7))
    loopback = Loopback(root)
    try:
        loopback.start_superlink()
        for name, (model, data) in sites.items():
            loopback.start_supernode(name, model, data,
                                     extra_config="require-secure=true" if name == "guarded" else "")
        yield root, loopback, sites
    finally:
        loopback.stop()
    for name, process in loopback.processes.items():
        assert process.poll() is not None, f"{name} still running"
    assert not loopback.ours(), [p.cmdline() for p in loopback.ours()]  # not even what left our process groups


def report_of(out):
    return json.loads((out / "report.json").read_text())


def test_merge_equals_offline_cli_and_misfits_are_named(federation):
    root, loopback, sites = federation
    out = root / "federated"
    done = loopback.run(f"out-dir='{out}' min-owners=3 timeout=180 heads='shared' record-dir='{root / 'records'}'")
    assert done.returncode == 0 and (out / "report.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    report = report_of(out)["federation"]
    owners = list(report["owners"].values())
    merged = sorted(o["site"] for o in owners if o["status"] == "merged")
    assert merged == list(GOOD), owners
    failed = [o for o in owners if o["status"] == "failed"]
    rejected = [o for o in owners if o["status"] == "rejected"]
    assert len(failed) == 2, failed
    assert any("no such data file" in o["reason"] for o in failed)
    assert any("requires secure mode" in o["reason"] for o in failed)  # it sent nothing in the clear
    reasons = {o["site"] or o["node_id"]: o["reason"] for o in rejected}
    assert len(rejected) == 2
    assert any(r.startswith("model type 'distilbert'") for r in reasons.values())  # another architecture
    assert any(r.startswith("model type 'bert', body") and "'LABEL_2'" in r.split(" does not fit")[0]
               for r in reasons.values())  # the same body, another label set, with heads shared
    for owner in failed + rejected:  # named by node id in the log as well
        assert f"owner node {owner['node_id']}" in done.stdout + done.stderr
    assert all(o["bytes_received"] > 0 for o in owners if o["status"] == "merged")

    # The same folders through the offline CLI (the sites' statistics files were written by the clients).
    offline = root / "offline"
    assert gramfuse([*"merge".split(), *(str(sites[n][0]) for n in GOOD), "-o", str(offline), "--quiet"]) == 0
    federated_weights = load_file(str(out / "model.safetensors"))
    offline_weights = load_file(str(offline / "model.safetensors"))
    assert federated_weights.keys() == offline_weights.keys()
    for name, value in offline_weights.items():
        scale = value.abs().max().clamp_min(1e-12)
        assert float((federated_weights[name] - value).abs().max() / scale) <= 1e-6, name
    assert (out / "tokenizer.json").is_file() and (out / "gramfuse-merge.json").is_file()

    # The merge's distance from each owner, by the plain formula from the folders (the server estimates the larger
    # tensors' part from a sample of their entries: within 2%).
    node_of = {o["site"]: o["node_id"] for o in owners if o["status"] == "merged"}
    for name in GOOD:
        own = load_file(str(sites[name][0] / "model.safetensors"))
        shared = [n for n, v in federated_weights.items() if v.is_floating_point() and n in own]
        difference = sum(float((federated_weights[n].double() - own[n].double()).square().sum()) for n in shared)
        norm = sum(float(own[n].double().square().sum()) for n in shared)
        (reported,) = report["influence"][str(node_of[name])]["merge_distance"].values()
        assert abs(reported - (difference / norm) ** 0.5) <= 0.02 * reported, name


def test_plaintext_records_reveal_each_site_statistics(federation):
    """The audit the secure deployment test passes finds every site's Grams in plaintext mode: it can fail."""
    root, _, sites = federation
    recorded = recorded_arrays(root / "records")  # written by the merge test's run
    for name in GOOD:
        stats = load_statistics(sites[name][0] / STATS_FILENAME)
        secrets = {f"gram {key}": stats.full_gram(key) for key in stats.grams}
        secrets.update({f"packed gram {key}": value for key, value in stats.grams.items()})
        found = {secret for _, secret, _ in revealing(recorded, secrets)}
        assert found == {f"packed gram {key}" for key in stats.grams}, name


def test_below_min_owners_fails_and_writes_nothing(federation):
    root, loopback, _ = federation
    out = root / "too-few"
    done = loopback.run(f"out-dir='{out}' min-owners=4 timeout=180 heads='shared'")
    assert "only 3 owners could be merged, min-owners is 4" in done.stdout + done.stderr
    assert not out.exists()
    assert not list(root.glob(".too-few.partial-*"))


def test_site_that_vanishes_mid_round_is_named_and_the_merge_goes_on(federation):
    root, loopback, _ = federation
    os.killpg(loopback.processes["good2"].pid, signal.SIGSTOP)  # the site stops answering altogether
    out = root / "vanished"
    done = loopback.run(f"out-dir='{out}' min-owners=2 timeout=60 heads='shared'")
    assert done.returncode == 0 and (out / "report.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    owners = list(report_of(out)["federation"]["owners"].values())
    assert sorted(o["site"] for o in owners if o["status"] == "merged") == ["good0", "good1"]
    lost = [o for o in owners if o["status"] in ("failed", "timed out") and "data file" not in o["reason"]
            and "requires secure mode" not in o["reason"]]
    assert len(lost) == 1
    assert f"owner node {lost[0]['node_id']}" in done.stdout + done.stderr
    merged = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())


def kill_when_asked_for_part(loopback, site, server_round=2):
    """Kill ``site`` the moment its SuperNode receives round ``server_round``: the first part of the model, after
    it sent its layout (round 1). The server must then merge again, without it, from the start."""
    log = loopback.root / f"{site}.log"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if f"ROUND {server_round}]" in log.read_text(errors="replace"):
            os.killpg(loopback.processes[site].pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def test_a_site_lost_after_parts_were_formed_is_merged_out_from_the_start(tmp_path):
    """Exactly the merge of the others: nothing of the lost site stays in any part already written."""
    base = tiny_model("bert")
    sites = {name: (save_owner(perturbed(base, seed=50 + i), tmp_path / name / "model"),
                    write_data(tmp_path / name / "data.jsonl", 30, seed=i)) for i, name in enumerate(GOOD)}
    loopback = Loopback(tmp_path)
    try:
        loopback.start_superlink()
        for name, (model, data) in sites.items():
            loopback.start_supernode(name, model, data)
        watcher = threading.Thread(target=kill_when_asked_for_part, args=(loopback, "good2"), daemon=True)
        watcher.start()
        out = tmp_path / "federated"
        done = loopback.run(f"out-dir='{out}' min-owners=2 timeout=60 part-mb=1")
    finally:
        loopback.stop()
    assert done.returncode == 0 and (out / "report.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    report = report_of(out)
    assert sorted(o["site"] for o in report["owners"]) == ["good0", "good1"]
    lost = [o for o in report["federation"]["owners"].values() if o["site"] == "good2"]
    assert len(lost) == 1 and lost[0]["status"] in ("failed", "timed out"), lost
    for name in ("good0", "good1"):
        assert gramfuse(["stats", str(sites[name][0]), str(sites[name][1]), "--quiet"]) == 0
    assert gramfuse(["merge", str(sites["good0"][0]), str(sites["good1"][0]), "-o", str(tmp_path / "offline"),
                     "--quiet"]) == 0
    federated = load_file(str(out / "model.safetensors"))
    offline = load_file(str(tmp_path / "offline" / "model.safetensors"))
    assert federated.keys() == offline.keys()
    for name, value in offline.items():
        scale = float(value.abs().max().clamp_min(1e-30))
        assert float((federated[name] - value).abs().max()) <= 1e-6 * scale, name
