"""RegMean++ against an independent float64 implementation of its semantics (issue 14), on tiny BERT, GPT-2 and
Llama owners, through `gramfuse merge --method regmean++ --data`; and its errors.

The reference knows nothing of gramfuse's pass: it is given each architecture's units by name, runs whole forward
passes of a fresh untied model per owner and unit (merged units before, the owner's own unit, the owner's own rest),
stacks every linear layer's input rows, forms each layer's own Gram (no sharing, no packing) and solves each layer
with numpy; every other parameter of a unit is the count-weighted average.
"""

import copy
import json
import random

import numpy as np
import pytest
import torch
from helpers import (
    kinds_of,
    layer_inputs,
    perturbed,
    save_owner,
    tiny_family,
    tiny_model,
    tokenizer,
    weight_t,
    write_data,
    write_task_data,
)
from safetensors.torch import load_file

from fusion.checkpoint import tied_aliases
from fusion.cli import main
from fusion.plusplus import forward_units, untie
from fusion.workflows import DataSettings, task_batches

SETTINGS = DataSettings(max_length=16, batch_size=8)
UNITS = {  # each architecture's units in forward order, written out by hand
    "bert": ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler", "classifier"],
    "gpt2-lm": ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1", "transformer.ln_f",
                "lm_head"],
    "llama-lm": ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"],
}


def owners_of(family: str, tmp_path, count: int = 2):
    base = tiny_model("bert").double() if family == "bert" else tiny_family(family)
    task = "sequence-classification" if family == "bert" else "causal-lm"
    models, dirs, data = [], [], []
    for index in range(count):
        model = perturbed(base, seed=20 + index, scale=0.2)
        models.append(model)
        dirs.append(save_owner(model, tmp_path / f"owner{index}"))
        path = tmp_path / f"data{index}.jsonl"
        data.append(write_data(path, 30 + 10 * index, seed=index) if family == "bert"
                    else write_task_data(path, task, random.Random(index), 30 + 10 * index))
    return models, dirs, data


def in_unit(name: str, unit: str) -> bool:
    return name == unit or name.startswith(unit + ".")


def reference_plusplus(models, data, units) -> dict[str, torch.Tensor]:
    """The RegMean++ merge by its definition, every parameter by its own name (a tied head's included)."""
    config = copy.deepcopy(models[0].config)
    config.tie_word_embeddings = False
    states = [dict(model.state_dict()) for model in models]
    batches = [list(task_batches(models[0], tokenizer(), path, SETTINGS, False)) for path in data]
    counts = [sum(int(b["input_ids"].shape[0]) for b in owner_batches) for owner_batches in batches]
    kinds = kinds_of(models[0])
    merged: dict[str, torch.Tensor] = {}
    for unit in units:
        layers = [layer for layer in kinds if in_unit(layer, unit)]
        grams = []
        for state, owner_batches in zip(states, batches):
            hybrid = type(models[0])(config).double().eval()
            hybrid.load_state_dict({**state, **merged})
            rows = layer_inputs(hybrid, owner_batches)
            grams.append({layer: rows[layer].T @ rows[layer] for layer in layers})
        for name in [n for n in states[0] if in_unit(n, unit) and states[0][n].is_floating_point()]:
            layer = name.removesuffix(".weight")
            if layer in layers and name.endswith(".weight"):
                gram = sum(g[layer] for g in grams).numpy()
                rhs = sum(g[layer] @ weight_t(s[name], kinds[layer]) for g, s in zip(grams, states)).numpy()
                solution = torch.from_numpy(np.linalg.solve(gram, rhs))
                merged[name] = solution if kinds[layer] == "conv1d" else solution.T
            else:
                merged[name] = sum(c * s[name] for c, s in zip(counts, states)) / sum(counts)
    return merged


@pytest.mark.parametrize("family", sorted(UNITS))
def test_regmean_plusplus_equals_an_independent_implementation(family, tmp_path):
    models, dirs, data = owners_of(family, tmp_path)
    assert main(["merge", *map(str, dirs), "-o", str(tmp_path / "plusplus"), "--method", "regmean++", "--data",
                 *map(str, data), "--max-length", "16", "--batch-size", "8", "--quiet"]) == 0
    got = load_file(str(tmp_path / "plusplus" / "model.safetensors"))
    expected = reference_plusplus(models, data, UNITS[family])
    heads = {stored: alias for alias, stored in tied_aliases(models[0]).items()}  # a tied tensor is the head's solve
    report = json.loads((tmp_path / "plusplus" / "gramfuse-merge.json").read_text())
    worst = max(float(layer["condition"]) for layer in report["layers"].values())
    assert worst < 1e8  # well-posed, so that the comparison below is tight
    for name, value in got.items():
        want = expected[heads.get(name, name)]
        scale = float(want.abs().max())
        assert float((value - want).abs().max()) <= 1e-9 * scale, name
    assert report["regmean++"]["examples"] == {"owner0": 30, "owner1": 40}

    # and it is not RegMean: the merged prefix moves the later units' Grams
    for model_dir, data_file in zip(dirs, data):
        assert main(["stats", str(model_dir), str(data_file), "--max-length", "16", "--batch-size", "8",
                     "--quiet"]) == 0
    assert main(["merge", *map(str, dirs), "-o", str(tmp_path / "regmean"), "--quiet"]) == 0
    regmean = load_file(str(tmp_path / "regmean" / "model.safetensors"))
    last_block = UNITS[family][-3]
    moved = [n for n in got if in_unit(n, last_block) and not torch.allclose(got[n], regmean[n], rtol=1e-6, atol=0)]
    assert moved, "the last block merged as plain RegMean"


AVERAGED = {"bert": ["bert.embeddings"], "gpt2-lm": ["transformer.wte", "transformer.wpe", "transformer.ln_f"],
            "llama-lm": ["model.embed_tokens", "model.norm"]}


@pytest.mark.parametrize("family", sorted(UNITS))
def test_units_are_found_in_forward_order(family):
    """Units without linear layers first (their merge needs no Grams), then the others in forward order; the lists
    of blocks are chains, so their blocks are replayed."""
    model = tiny_model("bert").double() if family == "bert" else tiny_family(family)
    batch = tokenizer()(["a good film", "the plot"], return_tensors="pt", padding=True)
    units = forward_units(model, dict(batch), untie(model))
    solved = [unit for unit in UNITS[family] if unit not in AVERAGED[family]]
    assert [unit.name for unit in units] == AVERAGED[family] + solved
    assert all(bool(unit.stack) == (unit.index >= 0) for unit in units)
    assert sum(bool(unit.stack) for unit in units) == 2  # the two blocks


def test_t5_units_run_the_encoder_then_the_decoder():
    model = tiny_family("t5-seq2seq")
    batch = dict(tokenizer()(["a good film"], return_tensors="pt"))
    batch["decoder_input_ids"] = batch["input_ids"]
    units = forward_units(model, batch, untie(model))
    names = [unit.name for unit in units if unit.layers]
    assert names == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1", "lm_head"]
    assert {unit.stack for unit in units if unit.layers} == {"encoder.block", "decoder.block", ""}


def xlm_classifier():
    """XLM calls its two lists (attentions, feed-forwards) in turn: not chains, so nothing of it is replayed."""
    from transformers import XLMConfig, XLMForSequenceClassification

    torch.manual_seed(0)
    config = XLMConfig(vocab_size=30522, emb_dim=16, n_layers=2, n_heads=2, max_position_embeddings=64, num_labels=2)
    return XLMForSequenceClassification(config).double().eval()


@pytest.mark.parametrize("family", ["t5-seq2seq", "llama-lm", "gpt2-lm", "xlm"])
def test_owners_that_are_one_model_see_its_own_inputs(family, tmp_path):
    """Two owners holding one model: the merge is that model, so every Gram of the pass must equal the model's
    plain statistics (`gramfuse stats`). This holds the replay of merged blocks (T5's position biases handed from
    block to block included) and the order of units to the plain forward pass."""
    from fusion.merge import open_owner, plusplus_owners
    from fusion.methods import get_method
    from fusion.statistics import load_statistics
    from fusion.workflows import compute_statistics

    task = {"t5-seq2seq": "seq2seq", "xlm": "sequence-classification"}.get(family, "causal-lm")
    model = xlm_classifier() if family == "xlm" else tiny_family(family)
    folder = save_owner(model, tmp_path / "one")
    data = write_task_data(tmp_path / "data.jsonl", task, random.Random(3), 20)
    compute_statistics(folder, data, settings=SETTINGS, progress=False)
    plain = load_statistics(folder / "gramfuse-stats.safetensors")
    twin = tmp_path / "twin"
    twin.mkdir()
    for item in folder.iterdir():
        (twin / item.name).write_bytes(item.read_bytes())
    owners = [open_owner(name, path, False) for name, path in (("one", folder), ("twin", twin))]
    plusplus_owners(owners, [data, data], get_method("regmean++", tied="embedding"),
                    {o.name: o.files.fingerprint() for o in owners}, SETTINGS, None, "cpu", None)
    for owner in owners:
        stats = owner.statistics
        assert set(stats.modules) == set(plain.modules)
        for layer, info in stats.modules.items():
            got, want = stats.grams[info.gram], plain.grams[plain.modules[layer].gram]
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max())), (family, layer)


def test_every_task_type_merges_and_loads(tmp_path):
    from fusion.checkpoint import load_model

    for family, task in (("t5-seq2seq", "seq2seq"), ("bert-token", "token-classification")):
        base = tiny_family(family)
        dirs, data = [], []
        for index in range(2):
            dirs.append(str(save_owner(perturbed(base, seed=index), tmp_path / family / f"o{index}")))
            data.append(str(write_task_data(tmp_path / family / f"d{index}.jsonl", task, random.Random(index), 12)))
        out = tmp_path / family / "out"
        assert main(["merge", *dirs, "-o", str(out), "--method", "regmean++", "--data", *data, "--quiet"]) == 0
        model, missing = load_model(out)
        assert not missing and all(torch.isfinite(p).all() for p in model.parameters())


def test_weights_shared_across_depth_are_refused(tmp_path, capsys):
    from transformers import AlbertConfig, AlbertForSequenceClassification

    config = AlbertConfig(vocab_size=30522, embedding_size=8, hidden_size=16, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=24, max_position_embeddings=64)
    base = AlbertForSequenceClassification(config).eval()
    dirs = [str(save_owner(perturbed(base, seed=i), tmp_path / f"o{i}")) for i in range(2)]
    data = [str(write_data(tmp_path / f"d{i}.jsonl", 8, seed=i)) for i in range(2)]
    assert main(["merge", *dirs, "-o", str(tmp_path / "out"), "--method", "regmean++", "--data", *data,
                 "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "regmean++" in error and "albert.encoder.albert_layer_groups.0" in error and "runs 2 times" in error
    assert not (tmp_path / "out").exists()


def test_data_files_are_one_per_owner_and_only_for_regmean_plusplus(tmp_path, capsys):
    _, dirs, data = owners_of("bert", tmp_path)
    dirs, data = list(map(str, dirs)), list(map(str, data))
    out = str(tmp_path / "out")
    assert main(["merge", *dirs, "-o", out, "--method", "regmean++", "--quiet"]) == 1
    assert "one data file per model folder" in capsys.readouterr().err
    assert main(["merge", *dirs, "-o", out, "--method", "regmean++", "--data", data[0], "--quiet"]) == 1
    assert "2 folders, 1 data files" in capsys.readouterr().err
    assert main(["merge", *dirs, "-o", out, "--method", "regmean++", "--data", data[0], str(tmp_path / "nope.jsonl"),
                 "--quiet"]) == 1
    assert "owner1" in (err := capsys.readouterr().err) and "does not exist" in err
    assert main(["merge", *dirs, "-o", out, "--method", "regmean++", "--data", *data, "--save-sums",
                 str(tmp_path / "sums"), "--quiet"]) == 1
    assert "no sums" in capsys.readouterr().err
    assert main(["merge", *dirs, "-o", out, "--method", "average", "--data", *data, "--quiet"]) == 1
    assert "regmean++" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "sums").exists()


def test_the_federation_refuses_regmean_plusplus():
    from fusion.errors import MergeError
    from server.app import methods_from

    for config in ({"method": "regmean++"}, {"method": "regmean,regmean++:alpha=0.5"}):
        with pytest.raises(MergeError, match="offline"):
            methods_from(config)
    assert [m.name for m in methods_from({"method": "regmean"})] == ["regmean"]


def test_owners_of_different_label_sets_keep_their_heads(tmp_path):
    """Each owner's data is read against its own labels, the heads are never merged, and each owner's folder holds
    the merged body with its own head, as RegMean's."""
    two, three = tiny_model("bert").double(), tiny_model("bert", num_labels=3).double()
    three.load_state_dict({k: v for k, v in two.state_dict().items() if not k.startswith("classifier")},
                          strict=False)
    dirs = [str(save_owner(perturbed(model, seed=i), tmp_path / f"o{i}")) for i, model in enumerate((two, three))]
    data = [str(write_data(tmp_path / f"d{i}.jsonl", 20, seed=i, num_labels=n)) for i, n in enumerate((2, 3))]
    assert main(["merge", *dirs, "-o", str(tmp_path / "out"), "--method", "regmean++", "--data", *data,
                 "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "gramfuse-merge.json").read_text())
    assert report["outputs"] == {"o0": ["o0"], "o1": ["o1"]}  # every label set its own: a folder each
    own = load_file(str(tmp_path / "o1" / "model.safetensors"))
    merged = load_file(str(tmp_path / "out" / "o1" / "model.safetensors"))
    assert torch.equal(merged["classifier.weight"], own["classifier.weight"])
    body = load_file(str(tmp_path / "out" / "o0" / "model.safetensors"))
    assert torch.equal(merged["bert.encoder.layer.1.output.dense.weight"],
                       body["bert.encoder.layer.1.output.dense.weight"])
