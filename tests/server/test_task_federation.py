"""Every task type through Flower itself (`flwr run` on the simulation engine), in the mode it is least covered in
elsewhere: a BERT token classifier in plaintext mode, T5 seq2seq and GPT-2's Conv1D causal LM in secure mode. Each
site detects its task from its checkpoint and reads its own task's data file; the merge equals `gramfuse merge`."""

import json
import random

import pytest
from helpers import assert_same_tensors, perturbed, save_owner, simulate, tiny_family, write_task_data
from safetensors.torch import load_file

from fusion.cli import main as gramfuse
from fusion.tasks import model_task

OWNERS = 3
RUNS = [("bert-token", "plaintext"), ("t5-seq2seq", "secure"), ("gpt2-lm", "secure")]


@pytest.mark.parametrize("family, mode", RUNS)
def test_a_federation_of_each_task_equals_the_offline_merge(tmp_path, family, mode):
    base = tiny_family(family).float()
    task = model_task(base).name
    workspace = tmp_path / "workspace"
    rng = random.Random(3)
    for i in range(OWNERS):
        save_owner(perturbed(base, seed=70 + i), workspace / f"owner{i}" / "model")
        write_task_data(workspace / f"owner{i}" / "data.jsonl", task, rng, 24)
    extra = "secure=true part-mb=0" if mode == "secure" else "part-mb=1"  # several parts in either mode
    report = simulate(tmp_path, workspace, f"method='regmean,average' {extra}", OWNERS)
    owners = report["federation"]["owners"].values()
    assert sorted(o["site"] for o in owners if o["status"] == "merged") == [f"owner{i}" for i in range(OWNERS)]
    assert ("secure" in report["federation"]) == (mode == "secure")
    assert report["federation"]["timings"]["parts"] >= 2  # the server held one part's sums at a time
    models = [str(workspace / f"owner{i}" / "model") for i in range(OWNERS)]
    for method in ("regmean", "average"):
        offline = tmp_path / f"offline-{method}"
        assert gramfuse(["merge", *models, "-o", str(offline), "--quiet", "--method", method]) == 0
        federated = tmp_path / "out" / method
        assert_same_tensors(load_file(str(federated / "model.safetensors")),
                            load_file(str(offline / "model.safetensors")), f"{family} {method}")
        config = json.loads((federated / "config.json").read_text())
        assert config["architectures"] == json.loads((offline / "config.json").read_text())["architectures"]
