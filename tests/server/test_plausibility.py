"""Plausibility of sites against each other (plaintext mode): the rule on hand-made cases, then a simulated
federation in which one site carries a weight of 1e30 and another Grams scaled by 1e12; both are rejected by node id
and the merge equals `gramfuse merge` of the two others."""

import json

import pytest
import torch
from helpers import assert_same_tensors, perturbed, save_owner, simulate, tiny_model, write_data
from safetensors.torch import load_file, save_file

from fusion.cli import main as gramfuse
from fusion.statistics import METADATA_KEY, STATS_FILENAME, read_metadata
from server.plausibility import influence, lower_median, near_one_owner, outliers


def test_the_reference_is_the_lower_median_so_two_sites_still_name_the_outlier():
    assert lower_median([1.0, 1e30]) == 1.0 and lower_median([3.0, 1.0, 2.0]) == 2.0
    assert set(outliers({1: {"w": 1.0}, 2: {"w": 1e30}}, "scale")) == {2}
    assert outliers({1: {"w": 1.0}, 2: {"w": 50.0}, 3: {"w": 2.0}}, "scale") == {}  # within the factor of 100
    found = outliers({1: {"w": 1.0, "b": 1.0}, 2: {"w": 1.2, "b": 300.0}, 3: {"w": float("nan"), "b": 1.0}}, "scale")
    assert set(found) == {2, 3} and "'b'" in found[2] and "300 times" in found[2] and "finite" in found[3]


def test_influence_is_each_sites_share_of_the_summed_traces_and_examples():
    layouts = {1: {"traces": {"g": 1.0, "h": 3.0}, "statistics": {"example_count": 10}},
               2: {"traces": {"g": 3.0, "h": 1.0}, "statistics": {"example_count": 30}}}
    shares = influence(layouts)
    assert shares[1] == pytest.approx({"examples_share": 0.25, "largest_gram_share": 0.75, "mean_gram_share": 0.5})
    assert shares[2]["largest_gram_share"] == pytest.approx(0.75)


def test_a_merge_close_to_one_owner_and_far_from_the_others_names_it():
    # the measurement: inflated Grams put the merge 0.017 from the inflating owner, 0.8 from the others
    assert near_one_owner({"a": 0.017, "b": 0.8, "c": 0.81}) == "a"
    assert near_one_owner({"a": 0.05, "b": 0.07, "c": 0.09}) is None  # honest owners lie at comparable distances
    assert near_one_owner({"a": 0.0}) is None  # one owner: the merge is its model


@pytest.fixture(scope="module")
def implausible(tmp_path_factory):
    root = tmp_path_factory.mktemp("implausible")
    workspace = root / "workspace"
    base = tiny_model("bert")
    for i in range(4):
        model = save_owner(perturbed(base, seed=110 + i), workspace / f"owner{i}" / "model")
        data = write_data(workspace / f"owner{i}" / "data.jsonl", 24, seed=i)
        if i == 1:  # one weight of 1e30
            weights = load_file(str(model / "model.safetensors"))
            weights["bert.encoder.layer.0.output.dense.weight"][0, 0] = 1e30
            save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
        assert gramfuse(["stats", str(model), str(data), "--quiet"]) == 0  # the sites reuse these files
        if i == 2:  # every Gram scaled by 1e12, its counts left as they were
            stats = model / STATS_FILENAME
            meta = read_metadata(stats)
            tensors = {k: v * 1e12 if k.startswith("gram.") else v for k, v in load_file(str(stats)).items()}
            save_file(tensors, str(stats), metadata={METADATA_KEY: json.dumps(meta)})
    report = simulate(root, workspace, "method='regmean' min-owners=2", 4)
    return root, workspace, report


def test_sites_far_above_the_others_are_rejected_and_the_merge_is_the_others(implausible):
    root, workspace, report = implausible
    owners = {o["site"]: o for o in report["federation"]["owners"].values()}
    assert owners["owner1"]["status"] == "rejected" and "largest weight magnitude" in owners["owner1"]["reason"]
    assert "bert.encoder.layer.0.output.dense.weight" in owners["owner1"]["reason"]
    assert owners["owner2"]["status"] == "rejected" and "Gram trace per token" in owners["owner2"]["reason"]
    assert sorted(s for s, o in owners.items() if o["status"] == "merged") == ["owner0", "owner3"]
    shares = report["federation"]["influence"]
    assert len(shares) == 2 and all(0.2 < s["mean_gram_share"] < 0.8 for s in shares.values())
    distances = [d for s in shares.values() for d in s["merge_distance"].values()]  # two honest owners' merge
    assert len(distances) == 2 and all(0 < d < 1 for d in distances) and near_one_owner(dict(enumerate(distances))) is None
    models = [str(workspace / name / "model") for name in ("owner0", "owner3")]
    assert gramfuse(["merge", *models, "-o", str(root / "offline"), "--quiet"]) == 0
    merged = load_file(str(root / "out" / "model.safetensors"))
    assert all(torch.isfinite(v).all() and float(v.abs().max()) < 1e3 for v in merged.values())
    assert_same_tensors(merged, load_file(str(root / "offline" / "model.safetensors")))
