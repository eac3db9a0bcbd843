"""`flwr run` on Flower's simulation engine: one simulated node per owner folder of a workspace (tiny causal LMs
with a tied head), comparing several methods from one round, the server asking for the model in several parts (a
small part-mb)."""

import json

import pytest
from helpers import assert_same_tensors, perturbed, save_owner, simulate, tiny_causal_lm, write_data
from safetensors.torch import load_file

from fusion.cli import main as gramfuse

METHODS = {"regmean:alpha=0.5": ["--method", "regmean", "--alpha", "0.5"], "regmean": ["--method", "regmean"],
           "average": ["--method", "average"]}


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    root = tmp_path_factory.mktemp("simulation")
    workspace = root / "workspace"
    base = tiny_causal_lm()
    for i in range(3):
        save_owner(perturbed(base, seed=40 + i), workspace / f"owner{i}" / "model")
        write_data(workspace / f"owner{i}" / "data.jsonl", 30, seed=i)
    simulate(root, workspace, f"method='{','.join(METHODS)}' part-mb=1", owners=3)
    return root, workspace


@pytest.mark.parametrize("label", list(METHODS))
def test_each_method_of_one_simulated_round_equals_the_offline_cli(simulated, label):
    root, workspace = simulated
    report = json.loads((root / "out" / "report.json").read_text())
    assert set(report["methods"]) == set(METHODS)
    assert report["federation"]["timings"]["parts"] >= 2  # the server held one part's sums at a time
    owners = report["federation"]["owners"].values()
    assert sorted(o["site"] for o in owners if o["status"] == "merged") == ["owner0", "owner1", "owner2"]
    models = [str(workspace / f"owner{i}" / "model") for i in range(3)]
    offline = root / f"offline-{label}"
    assert gramfuse(["merge", *models, "-o", str(offline), "--quiet", *METHODS[label]]) == 0
    federated = load_file(str(root / "out" / label / "model.safetensors"))
    expected = load_file(str(offline / "model.safetensors"))
    assert_same_tensors(federated, expected, label)
    assert "lm_head.weight" not in federated  # the tied head is one tensor
    config = json.loads((root / "out" / label / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]


def test_a_simulation_with_fewer_nodes_than_owners_fails_naming_those_left_out(tmp_path):
    from server.processes import Loopback

    workspace = tmp_path / "workspace"
    base = tiny_causal_lm()
    for i in range(3):
        save_owner(perturbed(base, seed=40 + i), workspace / f"owner{i}" / "model")
        write_data(workspace / f"owner{i}" / "data.jsonl", 10, seed=i)
    simulation = Loopback(tmp_path / "flower", simulation=True)
    try:
        simulation.start_superlink()
        done = simulation.run(f"workspace='{workspace}' out-dir='{tmp_path / 'out'}' timeout=120", num_supernodes=2)
    finally:
        simulation.stop()
    output = done.stdout + done.stderr
    assert "the workspace holds 3 owners but the simulation runs 2 nodes: owner2 would be left out" in output
    assert "num-supernodes=3" in output and not (tmp_path / "out").exists()
