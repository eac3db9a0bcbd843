"""LoRA adapter folders (made with peft) as owners: effective weights as peft merges them, statistics of the adapted
layers only, the merge at the pooled optimum on them, the base everywhere else, and a rank-r adapter of the merge."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import (WORDS, layer_inputs, make_adapter, pooled_least_squares, pooled_objective, tiny_causal_lm,
                     tokenizer, weight_t)

from fusion.adapters import AdapterFiles, open_adapter
from fusion.cli import main
from fusion.errors import GramfuseError
from fusion.statistics import load_statistics

# peft (pyproject's test extra, installed by `make setup`) is the reference for reading adapters: a missing peft
# fails these tests rather than skipping them.


def gramfuse(*args):
    return main([*map(str, args), "--quiet"])


@pytest.fixture()
def federation(tmp_path):
    base = tiny_causal_lm(seed=3)
    base_dir = tmp_path / "base"
    base.save_pretrained(str(base_dir))
    tokenizer().save_pretrained(str(base_dir))
    owners, effective, data = [], [], []
    rng = random.Random(0)
    for i, (targets, rslora) in enumerate([(["q_proj", "v_proj"], False), (["q_proj", "v_proj", "down_proj"], True)]):
        folder, merged = make_adapter(base, base_dir, tmp_path / f"adapter{i}", targets, seed=i, rslora=rslora)
        owners.append(folder)
        effective.append(merged.eval())
        path = tmp_path / f"data{i}.jsonl"
        path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))})
                                + "\n" for _ in range(30)))
        data.append(path)
    return base, base_dir, owners, effective, data


def test_effective_weights_are_what_peft_merges(federation):
    _, _, owners, effective, _ = federation
    for folder, model in zip(owners, effective):
        files = AdapterFiles(open_adapter(folder))
        state = model.state_dict()
        for name in files:
            torch.testing.assert_close(files[name], state[name], rtol=1e-6, atol=1e-7)


def test_statistics_hook_only_the_adapted_layers(federation):
    _, _, owners, _, data = federation
    assert gramfuse("stats", owners[1], data[1]) == 0
    stats = load_statistics(owners[1] / "gramfuse-stats.safetensors")
    assert set(stats.modules) == {f"model.layers.{i}.{m}" for i in range(2)
                                  for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}


def test_adapter_owners_merge_at_the_pooled_optimum_and_keep_the_base_elsewhere(federation, tmp_path):
    from transformers import AutoModelForCausalLM

    base, _, owners, effective, data = federation
    for folder, data_file in zip(owners, data):
        assert gramfuse("stats", folder, data_file) == 0
    assert gramfuse("merge", *owners, "-o", tmp_path / "merged", "--lora-rank", "8") == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).double()
    merged_state, base_state = merged.state_dict(), base.state_dict()
    batches = [[dict(tokenizer()([json.loads(line)["text"] for line in d.read_text().splitlines()], padding=True,
                                 return_tensors="pt"))] for d in data]
    inputs = [layer_inputs(model.double(), b) for model, b in zip(effective, batches)]
    both = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    for module in both:  # adapted by every owner: RegMean on the effective weights
        xs = [owner_inputs[module] for owner_inputs in inputs]
        targets = [weight_t(m.state_dict()[module + ".weight"], "linear") for m in effective]
        optimum = pooled_objective(xs, targets, pooled_least_squares(xs, targets))
        achieved = pooled_objective(xs, targets, weight_t(merged_state[module + ".weight"], "linear"))
        assert achieved - optimum <= 1e-5 * optimum, module
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                 "model.embed_tokens.weight"):  # no owner adapted these: the base, exactly
        torch.testing.assert_close(merged_state[name], base_state[name].double(), rtol=0, atol=0)
    report = json.loads((tmp_path / "merged" / "gramfuse-merge.json").read_text())
    assert any("down_proj" in warning for warning in report["warnings"])  # adapted by one owner only: averaged


def test_a_rank_r_adapter_of_the_merge_loads_in_peft_with_its_reported_error(federation, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, base_dir, owners, _, data = federation
    for folder, data_file in zip(owners, data):
        assert gramfuse("stats", folder, data_file) == 0
    assert gramfuse("merge", *owners, "-o", tmp_path / "merged", "--lora-rank", "3") == 0
    report = json.loads((tmp_path / "merged" / "gramfuse-merge.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).state_dict()
    base_state = base.state_dict()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                                       str(tmp_path / "merged" / "lora")).merge_and_unload().state_dict()
    assert report["lora"]["rank"] == 3 and set(report["lora"]["layers"]) >= {"model.layers.0.self_attn.q_proj"}
    for module, error in report["lora"]["layers"].items():
        name = module + ".weight"
        delta = merged[name].double() - base_state[name].double()
        values = torch.linalg.svdvals(delta)
        assert error == pytest.approx(float(values[3:].norm() / values.norm()), rel=1e-4, abs=1e-7)
        approximation = loaded[name].double() - base_state[name].double()
        assert float((approximation - delta).norm() / delta.norm()) == pytest.approx(error, rel=1e-3, abs=1e-6)


def test_an_adapter_whose_base_is_not_here_asks_for_base_and_base_overrides(federation, tmp_path, capsys):
    _, base_dir, owners, _, data = federation
    settings = json.loads((owners[0] / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M"  # a hub name: not a folder here
    (owners[0] / "adapter_config.json").write_text(json.dumps(settings))
    assert gramfuse("stats", owners[0], data[0]) == 1
    assert "give --base" in capsys.readouterr().err
    assert gramfuse("stats", owners[0], data[0], "--base", base_dir) == 0
    with pytest.raises(GramfuseError, match="give --base"):
        open_adapter(owners[0])
