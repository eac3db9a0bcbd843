"""`flwr run` on Flower's simulation engine: one simulated node per owner folder of a workspace (tiny models)."""

import json

import torch
from helpers import perturbed, save_owner, tiny_model, write_data
from safetensors.torch import load_file

from fusion.cli import main as gramfuse
from server.processes import Loopback


def test_simulated_federation_equals_offline_cli(tmp_path):
    workspace = tmp_path / "workspace"
    base = tiny_model("gpt2")
    for i in range(3):
        save_owner(perturbed(base, seed=40 + i), workspace / f"owner{i}" / "model")
        write_data(workspace / f"owner{i}" / "data.jsonl", 30, seed=i)
    simulation = Loopback(tmp_path, simulation=True)
    try:
        simulation.start_superlink()
        done = simulation.run(f"workspace='{workspace}' out-dir='{tmp_path / 'out'}' min-owners=3 timeout=300",
                              num_supernodes=3)
    finally:
        simulation.stop()
    assert simulation.processes["superlink"].poll() is not None
    assert (tmp_path / "out" / "report.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())["federation"]
    assert sorted(o["site"] for o in report["owners"].values()) == ["owner0", "owner1", "owner2"]

    models = [str(workspace / f"owner{i}" / "model") for i in range(3)]
    assert gramfuse(["merge", *models, "-o", str(tmp_path / "offline"), "--quiet"]) == 0
    federated = load_file(str(tmp_path / "out" / "model.safetensors"))
    offline = load_file(str(tmp_path / "offline" / "model.safetensors"))
    for name, value in offline.items():
        assert torch.allclose(federated[name], value, rtol=1e-6, atol=1e-6 * float(value.abs().max())), name
