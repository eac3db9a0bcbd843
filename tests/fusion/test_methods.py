"""Every merge method on tiny random models, against formulas computed here; the registry's errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import perturbed, tiny_model, tokenizer

from fusion.errors import MergeError
from fusion.fisher import collect_fisher
from fusion.gram import collect_statistics
from fusion.merge import merge_states
from fusion.methods import METHODS, MergeContext, OwnerState, get_method
from fusion.methods._relative import depth_scalings
from fusion.methods.ties import trim

TEXTS = [["good movie", "awful plot, slow"], ["the battery broke again", "great price", "fine phone"]]


@pytest.fixture(scope="module")
def owners():
    base = tiny_model("bert")
    found = []
    for i, texts in enumerate(TEXTS):
        model = perturbed(base, seed=i + 1)
        batch = dict(tokenizer()(texts, padding=True, return_tensors="pt"))
        stats = collect_statistics(model, [batch])
        batch["labels"] = torch.tensor([i % 2] * len(texts))
        stats.fisher, stats.fisher_example_count = collect_fisher(model, [batch])
        found.append(OwnerState(f"owner{i}", {k: v.clone() for k, v in model.state_dict().items()
                                             if v.is_floating_point()}, stats))
    return base, found


def test_registry_holds_every_method():
    assert {"regmean", "average", "weighted-average", "fisher", "task-arithmetic", "ties"} <= set(METHODS)


def test_unknown_method_and_option_are_clear_errors():
    with pytest.raises(MergeError, match="unknown merge method 'nope'.*regmean"):
        get_method("nope")
    with pytest.raises(MergeError, match="takes no option alpha"):
        get_method("average", alpha=0.5)
    with pytest.raises(MergeError, match="alpha must be in"):
        get_method("regmean", alpha=2.0)


def test_average(owners):
    _, states = owners
    merged = merge_states(states, get_method("average")).params
    for name in states[0].params:
        torch.testing.assert_close(merged[name], (states[0].params[name].double() + states[1].params[name].double()) / 2)


def test_weighted_average_weighs_by_example_count(owners):
    _, states = owners
    merged = merge_states(states, get_method("weighted-average")).params
    counts = [s.statistics.example_count for s in states]
    assert counts == [2, 3]
    name = "bert.embeddings.LayerNorm.weight"
    expected = (2 * states[0].params[name].double() + 3 * states[1].params[name].double()) / 5
    torch.testing.assert_close(merged[name], expected)


def test_fisher_weights_each_entry_by_its_fisher(owners):
    _, states = owners
    merged = merge_states(states, get_method("fisher")).params
    name = "classifier.weight"
    f0, f1 = (s.statistics.fisher[name].double() for s in states)
    assert (f0 > 0).any()
    expected = (f0 * states[0].params[name] + f1 * states[1].params[name]) / (f0 + f1)
    torch.testing.assert_close(merged[name], expected)


def test_fisher_is_the_sum_of_per_example_squared_scores():
    model = tiny_model("bert")
    batch = dict(tokenizer()(["good movie", "bad"], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([1, 0])
    fisher, count = collect_fisher(model, [batch])
    expected = torch.zeros_like(model.classifier.weight)
    for row in range(2):
        single = tokenizer()([["good movie", "bad"][row]], return_tensors="pt")
        model.zero_grad()
        torch.log_softmax(model(**single).logits, -1)[0, batch["labels"][row]].backward()
        expected += model.classifier.weight.grad**2
    assert count == 2
    torch.testing.assert_close(fisher["classifier.weight"], expected)


def test_task_arithmetic(owners):
    base, states = owners
    context = MergeContext(base={k: v for k, v in base.state_dict().items() if v.is_floating_point()})
    merged = merge_states(states, get_method("task-arithmetic", scaling=0.5), context).params
    for name in ("bert.encoder.layer.0.attention.self.query.weight", "classifier.bias"):
        b = context.base[name].double()
        expected = b + 0.5 * sum(s.params[name].double() - b for s in states)
        torch.testing.assert_close(merged[name], expected)


def test_lines_scales_each_blocks_task_vector_by_its_depth():
    names = ["bert.embeddings.word_embeddings.weight", *(f"bert.encoder.layer.{i}.output.dense.weight" for i in range(4)),
             "classifier.weight", "encoder.block.0.x", "encoder.block.1.x", "decoder.block.0.x", "decoder.block.2.x",
             "decoder.block.1.x", "model.layers.0.mlp.up_proj.weight", "transformer.h.5.attn.c_attn.weight"]
    scalings = depth_scalings(names, 0.2, 0.6)
    assert scalings["bert.embeddings.word_embeddings.weight"] == scalings["classifier.weight"] == 0.2  # outside
    assert [scalings[f"bert.encoder.layer.{i}.output.dense.weight"] for i in range(4)] == pytest.approx(
        [0.2, 0.4, 0.6, 0.8])  # alpha + beta (l - 1) / (L - 1), l = 1..4
    assert scalings["encoder.block.1.x"] == pytest.approx(0.8)  # the encoder's 2 blocks and the decoder's 3 apart
    assert scalings["decoder.block.1.x"] == pytest.approx(0.5) and scalings["decoder.block.2.x"] == pytest.approx(0.8)
    assert scalings["model.layers.0.mlp.up_proj.weight"] == 0.2  # a stack of one block: alpha
    assert scalings["transformer.h.5.attn.c_attn.weight"] == pytest.approx(0.8)  # block 6 of 6 (GPT-2 names)


@pytest.mark.parametrize("name", ["task-arithmetic", "ties"])
def test_lines_on_task_vector_methods_is_the_plain_merge_with_a_scaling_per_block(name):
    # four blocks, merged group by group as every merge goes: each block's depth is counted in the whole model
    base = tiny_model("bert", num_hidden_layers=4)
    states = [OwnerState(f"o{i}", {k: v for k, v in perturbed(base, seed=i).state_dict().items()
                                   if v.is_floating_point()}) for i in range(2)]
    context = MergeContext(base={k: v for k, v in base.state_dict().items() if v.is_floating_point()})
    options = {"density": 0.5} if name == "ties" else {}
    plain = merge_states(states, get_method(name, scaling=1.0, **options), context).params
    lines = merge_states(states, get_method(name, scaling=0.3, lines_beta=0.6, **options), context).params
    assert get_method(name, scaling=0.3, lines_beta=0.5).sums_key() == get_method(name).sums_key()  # same sums
    scalings = depth_scalings(list(lines), 0.3, 0.6)
    assert [scalings[f"bert.encoder.layer.{i}.output.dense.weight"] for i in range(4)] == pytest.approx(
        [0.3, 0.5, 0.7, 0.9])
    for param, value in lines.items():
        b = context.base[param].double()
        torch.testing.assert_close(value, b + scalings[param] * (plain[param] - b))


def test_lines_on_regmean_scales_its_own_task_vector_by_depth(owners):
    """LiNeS on RegMean's task vector (merged minus base): block l of L keeps lines_alpha + lines_beta (l-1)/(L-1)
    of it, parameters outside the blocks lines_alpha; from the same sums as plain RegMean."""
    base, states = owners
    context = MergeContext(base={k: v for k, v in base.state_dict().items() if v.is_floating_point()},
                           modules=states[0].statistics.modules)
    plain = merge_states(states, get_method("regmean"), context).params
    method = get_method("regmean", lines_alpha=0.2, lines_beta=0.7)
    assert method.needs_base and not get_method("regmean").needs_base
    assert method.sums_key() == get_method("regmean").sums_key()  # chosen after the sums, like alpha
    lines = merge_states(states, method, context).params
    layers = base.config.num_hidden_layers
    for param, value in lines.items():
        depth = param.split("encoder.layer.")[1].split(".")[0] if "encoder.layer." in param else None
        keep = 0.2 + 0.7 * int(depth) / (layers - 1) if depth is not None else 0.2  # by hand, not depth_scalings
        b = context.base[param].double()
        torch.testing.assert_close(value.double(), b + keep * (plain[param].double() - b))
    with pytest.raises(MergeError, match="lines_alpha/lines_beta.*base model"):
        merge_states(states, method, MergeContext(modules=states[0].statistics.modules))


def test_ties_hand_computed():
    base = {"p": torch.zeros(5, dtype=torch.float64)}
    owners = [
        OwnerState("a", {"p": torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0], dtype=torch.float64)}),
        OwnerState("b", {"p": torch.tensor([1.0, -4.0, -0.2, -3.0, 0.0], dtype=torch.float64)}),
        OwnerState("c", {"p": torch.tensor([-2.0, 2.0, 0.1, -1.0, 0.0], dtype=torch.float64)}),
    ]
    merged = merge_states(owners, get_method("ties", density=1.0, scaling=1.0), MergeContext(base=base)).params["p"]
    # entry 0: sum +2 -> mean of (3, 1) = 2; entry 1: sum -3 -> mean of (-1, -4) = -2.5;
    # entry 2: sum +0.4 -> mean of (0.5, 0.1) = 0.3; entry 3: sum -2 -> mean of (-3, -1) = -2; entry 4: nothing.
    assert merged.tolist() == pytest.approx([2.0, -2.5, 0.3, -2.0, 0.0])


def test_ties_trim_keeps_the_largest_magnitudes():
    delta = torch.tensor([0.1, -5.0, 2.0, -0.3, 4.0], dtype=torch.float64)
    assert trim(delta, 0.4).tolist() == [0.0, -5.0, 0.0, 0.0, 4.0]
    assert trim(delta, 0.3).tolist() == [0.0, -5.0, 0.0, 0.0, 0.0]  # int(1.5) = 1, not rounded up to 2
    assert trim(delta, 0.1).tolist() == [0.0, -5.0, 0.0, 0.0, 0.0]  # at least one
    assert torch.equal(trim(delta, 1.0), delta)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([-2.0, -1.0, 0.5, 1.0, 2.0, 3.0]), min_size=1, max_size=40),
       st.floats(min_value=0.01, max_value=1.0))
def test_ties_trim_keeps_exactly_k_entries_even_where_magnitudes_tie(values, density):
    delta = torch.tensor(values, dtype=torch.float64)  # few distinct magnitudes: many ties at the k-th
    keep = max(1, int(density * len(values)))  # mergekit's count
    trimmed = trim(delta, density)
    kept = trimmed != 0
    assert int(kept.sum()) == keep
    assert torch.equal(trimmed[kept], delta[kept])
    if keep < len(values):
        assert float(delta[kept].abs().min()) >= float(delta[~kept].abs().max())


def test_ties_on_tiny_models_moves_only_from_the_base_by_trimmed_entries(owners):
    base, states = owners
    context = MergeContext(base={k: v for k, v in base.state_dict().items() if v.is_floating_point()})
    merged = merge_states(states, get_method("ties", density=0.2), context).params
    name = "bert.encoder.layer.0.output.dense.weight"
    changed = (merged[name] != context.base[name].double()).double().mean().item()
    assert 0.2 <= changed <= 0.4  # each owner keeps 20%; the union of two owners' entries is at most 40%


# RegMean++ refuses statistics files' Grams (tests/fusion/test_plusplus.py); every other method takes them here.
@pytest.mark.parametrize("method", [name for name in sorted(METHODS) if not METHODS[name].needs_data])
def test_every_method_gives_finite_parameters_of_the_right_shapes(owners, method):
    base, states = owners
    context = MergeContext(base={k: v for k, v in base.state_dict().items() if v.is_floating_point()})
    merged = merge_states(states, get_method(method), context).params
    assert set(merged) == set(states[0].params)
    for name, value in merged.items():
        assert value.shape == states[0].params[name].shape
        assert torch.isfinite(value).all()


def test_relative_methods_need_a_base(owners):
    _, states = owners
    with pytest.raises(MergeError, match="base model"):
        merge_states(states, get_method("ties"))


def test_nan_weights_are_rejected_naming_owner_and_layer(owners):
    _, states = owners
    bad = OwnerState("broken", dict(states[1].params), states[1].statistics)
    bad.params["classifier.weight"] = torch.full_like(bad.params["classifier.weight"], float("nan"))
    with pytest.raises(MergeError, match="owner 'broken': layer 'classifier.weight': weights hold NaN"):
        merge_states([states[0], bad], get_method("average"))
