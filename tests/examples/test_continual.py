"""The continual-merging example's bookkeeping on tiny owners: after each arrival the exact-sums merge equals RegMean
over every owner so far from scratch, the sequential pairwise average weighs owner i by 2^-(k-i+1), the running
average is uniform, and retention is accuracy over the owner's own."""

import pytest
import torch
from helpers import assert_same_merge, perturbed, save_owner, tiny_model, write_data
from safetensors.torch import load_file

from examples.continual import EXACT, PAIRWISE, RUNNING, merges_as_owners_arrive, retention_as_owners_arrive
from examples.owners import Owner
from fusion.cli import main as gramfuse
from fusion.merge import merge_folders
from fusion.methods import get_method


@pytest.fixture(scope="module")
def arrivals(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    base = tiny_model("bert")
    owners = []
    for i, name in enumerate(("first", "second", "third")):
        model = save_owner(perturbed(base, seed=60 + i), root / name)
        train = write_data(root / f"{name}-train.jsonl", 24, seed=i)
        assert gramfuse(["stats", str(model), str(train), "--quiet"]) == 0
        owners.append(Owner(name, name, ("negative", "positive"), model, train,
                            write_data(root / f"{name}-test.jsonl", 16, seed=10 + i)))
    return root, owners, merges_as_owners_arrive(owners, root / "steps")


def test_exact_sums_equal_regmean_from_scratch_after_every_arrival(arrivals):
    root, owners, steps = arrivals
    for k in (2, 3):
        scratch = root / f"scratch-{k}"
        merge_folders([o.model for o in owners[:k]], scratch, get_method("regmean"))
        assert_same_merge(steps[k - 1][EXACT], scratch, f"after {k}")


def test_pairwise_halves_the_early_owners_and_the_running_average_is_uniform(arrivals):
    _, owners, steps = arrivals
    weights = [load_file(str(o.model / "model.safetensors")) for o in owners]
    pairwise = load_file(str(steps[2][PAIRWISE] / "model.safetensors"))
    running = load_file(str(steps[2][RUNNING] / "model.safetensors"))
    for name, value in pairwise.items():
        if not value.is_floating_point():
            continue
        expected = 0.25 * weights[0][name] + 0.25 * weights[1][name] + 0.5 * weights[2][name]
        assert torch.allclose(value, expected, atol=1e-6), name
        assert torch.allclose(running[name], sum(w[name] for w in weights) / 3, atol=1e-6), name


def test_retention_is_accuracy_over_the_owners_own():
    owners = [Owner(n, n, (), n, None, n + "-test") for n in ("a", "b")]
    table = {("a", "a-test"): 0.8, ("b", "b-test"): 0.5, ("m1", "a-test"): 0.4, ("m2", "a-test"): 0.6,
             ("m2", "b-test"): 0.5}
    result = retention_as_owners_arrive(owners, [{EXACT: "m1"}, {EXACT: "m2"}], lambda m, d: table[(m, d)])
    assert result["retention"] == [{EXACT: {"a": 0.5}}, {EXACT: {"a": pytest.approx(0.75), "b": 1.0}}]
