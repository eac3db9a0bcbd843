"""Differential privacy of released statistics: clipping bounds every example's share, the noise is the calibrated
Gaussian, the accountant agrees with the analytic Gaussian mechanism, the noisy solve is sound, and two releases one
owner apart give that owner's Gram only to the noise level."""

import json
import math
from dataclasses import replace

import pytest
import torch
from helpers import layer_inputs, perturbed, save_owner, tiny_model, tokenizer, write_data
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForSequenceClassification

from fusion.budget import PrivacyBudget
from fusion.cli import main
from fusion.errors import StatisticsError
from fusion.gram import GramCollector, collect_statistics
from fusion.methods import MergeContext, OwnerState, Sums
from fusion.methods.regmean import GRAM, RegMean
from fusion.privacy import (MECHANISM, PrivacyError, PrivacySpec, add_noise, clipped_rows, gaussian_delta,
                            gaussian_epsilon, noise_multiplier, noise_ridge)
from fusion.solve import NOISY_SOLVER, solve_gram
from fusion.statistics import load_statistics, pack_upper, save_statistics, unpack_upper

SENTENCES = ["good movie", "the plot was slow and boring and the actor never smiled at all in it", "fine",
             "quite a great story", "a b c d e f g"]


def encode(texts):
    return dict(tokenizer()(texts, padding=True, return_tensors="pt"))


def clipped_grams(model, batches, clip):
    """Grams with per-example clipping and no noise, through the collector."""
    model.eval()
    with torch.no_grad(), GramCollector(model, clip=clip) as collector:
        for batch in batches:
            collector.set_mask([batch["attention_mask"]], batch["input_ids"].shape[0])
            model(**batch)
    return collector, collector.statistics()


@pytest.mark.parametrize("clip", [0.5, 3.0, 100.0])
def test_clipping_equals_an_example_by_example_reference(clip):
    """Each example alone through the model; its rows scaled to unit norm and weighted min(1, clip / tokens)."""
    model = tiny_model("bert")
    collector, stats = clipped_grams(model, [encode(SENTENCES[:3]), encode(SENTENCES[3:])], clip)
    expected: dict[str, torch.Tensor] = {}
    for sentence in SENTENCES:
        for layer, rows in layer_inputs(model, [encode([sentence])]).items():
            units = rows / rows.norm(dim=1, keepdim=True)
            share = min(1.0, clip / rows.shape[0]) * units.T @ units
            assert torch.linalg.matrix_norm(share) <= clip + 1e-9  # the bound the noise is calibrated to
            expected[layer] = expected.get(layer, 0) + share
    for layer, info in stats.modules.items():
        if info.gram == layer:
            torch.testing.assert_close(stats.full_gram(layer), expected[layer], rtol=1e-5, atol=1e-6)  # float32 forwards
    longest = max(len(tokenizer()(s)["input_ids"]) for s in SENTENCES)
    assert max(collector.clipped.values()) == sum(len(tokenizer()(s)["input_ids"]) > clip for s in SENTENCES)
    assert (max(collector.clipped.values()) == 0) == (clip >= longest)


@settings(deadline=None, max_examples=40)
@given(examples=st.integers(1, 5), tokens=st.integers(1, 7), features=st.integers(1, 6),
       clip=st.floats(0.1, 10.0), seed=st.integers(0, 10_000))
def test_no_example_moves_a_gram_by_more_than_clip(examples, tokens, features, clip, seed):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(examples, tokens, features, generator=generator) * 10
    mask = torch.rand(examples, tokens, generator=generator) < 0.7
    mask[:, 0] = True
    rows, _, pads_excluded = clipped_rows(inputs, [mask], examples, clip, "layer")
    assert pads_excluded
    owners = mask.nonzero()[:, 0]
    for example in range(examples):
        mine = rows[owners == example]
        assert float(torch.linalg.matrix_norm(mine.T @ mine)) <= clip * (1 + 1e-9)


def test_an_input_that_cannot_be_split_by_example_is_refused():
    with pytest.raises(PrivacyError, match="layer 'odd'"):
        clipped_rows(torch.ones(6, 4), [torch.ones(2, 5, dtype=torch.bool)], 2, 1.0, "odd")


class SharedBlock(torch.nn.Module):
    """One linear layer run twice per pass, as ALBERT runs its one shared block in every layer."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = torch.nn.Linear(4, 4)

    def forward(self, inputs):
        return self.shared(torch.tanh(self.shared(inputs)))


def test_a_layer_run_twice_per_pass_is_refused_under_clipping_only():
    batches = [torch.randn(3, 4, generator=torch.Generator().manual_seed(0))]
    exact = collect_statistics(SharedBlock(), batches)  # both passes' inputs in one Gram, as RegMean wants
    assert exact.token_counts == {"shared": 6}
    with pytest.raises(PrivacyError, match="layer 'shared' runs more than once per forward pass"):
        collect_statistics(SharedBlock(), batches, privacy=PrivacySpec(epsilon=1.0))


@pytest.mark.parametrize("epsilon,delta", [(0.5, 1e-5), (1.0, 1e-6), (4.0, 1e-8), (8.0, 2.5e-7)])
def test_the_accountant_agrees_with_dp_accounting(epsilon, delta):
    """Google's dp-accounting (privacy loss distributions, an independent implementation) as the oracle: our
    calibrated multiplier is the one it calibrates, one draw costs epsilon and composed draws cost what it says."""
    import dp_accounting
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    z = noise_multiplier(epsilon, delta)
    theirs = dp_accounting.calibrate_dp_mechanism(PLDAccountant, dp_accounting.GaussianDpEvent, epsilon, delta)
    assert z == pytest.approx(theirs, rel=0.005)
    assert gaussian_epsilon([z], delta) == pytest.approx(epsilon, rel=1e-9)
    accountant = PLDAccountant()
    accountant.compose(dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z),
                                                      dp_accounting.GaussianDpEvent(2 * z)]))
    assert gaussian_epsilon([z, 2 * z], delta) == pytest.approx(accountant.get_epsilon(delta), rel=0.005)
    assert gaussian_epsilon([z, z], delta) > 1.3 * epsilon  # two draws cost more than one
    assert gaussian_delta(1 / (0.97 * z), epsilon) > delta  # 3% less noise would break the guarantee


def test_noise_is_the_calibrated_gaussian_on_each_packed_entry():
    grams = {"a": torch.zeros(200 * 201 // 2, dtype=torch.float64), "b": torch.zeros(50 * 51 // 2, dtype=torch.float64)}
    spec = PrivacySpec(epsilon=2.0, delta=1e-6, clip=3.0, seed=7)
    release = add_noise(grams, spec, example_count=1000)
    # Replacing one example moves each Gram by up to sqrt(2) clip; two Grams: sqrt(2 * 2) clip in all.
    assert release.noise_std == pytest.approx(noise_multiplier(2.0, 1e-6) * 3.0 * math.sqrt(4))
    assert release.grams == 2 and release.noise_multiplier == noise_multiplier(2.0, 1e-6)
    noise = torch.cat(list(grams.values()))
    assert float(noise.std()) == pytest.approx(release.noise_std, rel=0.02)
    assert abs(float(noise.mean())) < 0.02 * release.noise_std
    # The symmetric matrix mirrors the triangle: each off-diagonal pair carries one draw, as Analyze Gauss asks.
    full = unpack_upper(grams["a"], 200)
    assert torch.equal(full, full.T)
    assert PrivacySpec(1.0).delta_for(100) == 1e-4
    with pytest.raises(PrivacyError, match="above 1/N"):  # a delta that allows giving one example away
        PrivacySpec(1.0, delta=0.05).delta_for(100)
    with pytest.raises(PrivacyError, match="between"):
        PrivacySpec(1e-6)


def test_replacement_moves_a_clipped_gram_by_at_most_root_two_clip():
    """The sensitivity the noise is sized for: two examples' clipped shares A and B (each of norm at most clip, both
    positive semi-definite) differ by at most sqrt(2) clip, and nearly that for orthogonal examples."""
    clip = 2.0
    first = torch.zeros(1, 3, 4)
    first[0, :, 0] = 1.0
    second = torch.zeros(1, 3, 4)
    second[0, :, 1] = 1.0
    mask = torch.ones(1, 3, dtype=torch.bool)
    shares = []
    for inputs in (first, second):
        rows, _, _ = clipped_rows(inputs, [mask], 1, clip, "layer")
        shares.append(rows.T @ rows)
    assert float(torch.linalg.matrix_norm(shares[0] - shares[1])) == pytest.approx(math.sqrt(2) * clip)


def test_differencing_two_releases_recovers_an_owner_only_to_the_noise_level(tmp_path):
    """The attack SECURITY.md describes: sums over owners {0, 1, 2} minus sums over {0, 1}. Without noise it gives
    owner 2's Gram to 1e-12; with DP statistics it gives that Gram plus noise of the calibrated size."""
    base = tiny_model("bert")
    owners = [perturbed(base, seed=20 + i) for i in range(3)]
    batches = [[encode(SENTENCES[i:i + 3])] for i in range(3)]
    method = RegMean()
    context = MergeContext(modules=None)
    for spec in (None, PrivacySpec(epsilon=4.0, delta=1e-5, seed=5)):
        states = []
        for i, (model, owner_batches) in enumerate(zip(owners, batches)):
            stats = collect_statistics(model, owner_batches, privacy=spec)
            context.modules = stats.modules
            states.append(OwnerState(f"o{i}", {k: v for k, v in model.state_dict().items()}, stats))
        three, two = Sums(), Sums()
        for state in states:
            three.add(method.contribute(state, context))
        for state in states[:2]:
            two.add(method.contribute(state, context))
        keys = sorted(states[2].statistics.grams)  # every Gram: thousands of entries for the noise's size
        recovered = torch.cat([three[GRAM + key] - two[GRAM + key] for key in keys])
        exact = clipped_grams(owners[2], batches[2], spec.clip)[1] if spec else states[2].statistics
        clean = torch.cat([exact.grams[key] for key in keys])
        error = float((recovered - clean).pow(2).mean().sqrt())
        if spec is None:
            assert error <= 1e-12 * float(clean.abs().max())
        else:
            noise_std = states[2].statistics.noise_std
            assert 0.95 * noise_std < error < 1.05 * noise_std  # the noise, all of it, and nothing less
            assert error > float(clean.abs().max())  # here it drowns the Gram itself


def test_noisy_solve_factorises_an_indefinite_gram_and_keeps_the_prior_where_data_is_weak():
    generator = torch.Generator().manual_seed(3)
    dim = 30
    inputs = torch.randn(500, dim, generator=generator, dtype=torch.float64)
    inputs[:, -5:] *= 1e-3  # directions the data barely reaches
    truth = torch.randn(dim, 4, generator=generator, dtype=torch.float64)
    prior = truth + 0.5 * torch.randn(dim, 4, generator=generator, dtype=torch.float64)
    noise_std = 2.0
    noise = unpack_upper(noise_std * torch.randn(dim * (dim + 1) // 2, generator=generator, dtype=torch.float64), dim)
    gram = inputs.T @ inputs + noise
    assert float(torch.linalg.eigvalsh(gram)[0]) < 0  # indefinite: a plain Cholesky fails
    ridge = noise_ridge(noise_std ** 2, dim)
    solution, report = solve_gram(gram.clone(), (inputs.T @ inputs + noise) @ truth, prior, noise_ridge=ridge)
    assert report.solver == NOISY_SOLVER and report.ridge >= ridge
    strong, weak = slice(0, dim - 5), slice(dim - 5, dim)
    assert float((solution[strong] - truth[strong]).norm()) < 0.1 * float((prior[strong] - truth[strong]).norm())
    # Where the data is weaker than the noise the prior is mostly kept, where a plain solve of the noisy Gram runs wild.
    assert float((solution[weak] - prior[weak]).norm()) < 0.3 * float((prior[weak] - truth[weak]).norm())
    plain = torch.linalg.solve(gram, (inputs.T @ inputs + noise) @ truth + 0.0 * prior)
    assert torch.allclose(plain, truth)  # the noise cancels only because rhs was made from the same noisy Gram
    unlucky = torch.linalg.solve(gram, inputs.T @ inputs @ truth)  # the clean right-hand side: a wild solve
    assert float((unlucky[weak] - truth[weak]).norm()) > 3 * float((solution[weak] - truth[weak]).norm())


def make_owners(tmp_path, count=2):
    base = tiny_model("bert")
    dirs, data = [], []
    for i in range(count):
        dirs.append(save_owner(perturbed(base, seed=10 + i), tmp_path / f"o{i}"))
        data.append(write_data(tmp_path / f"d{i}.jsonl", 40, seed=i))
    return dirs, data


def test_cli_dp_statistics_merge_loads_and_reports_the_noise(tmp_path, capsys):
    dirs, data = make_owners(tmp_path)
    for folder, data_file in zip(dirs, data):
        assert main(["stats", str(folder), str(data_file), "--dp-epsilon", "4", "--dp-clip", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "(4, 0.000625)-DP" in printed and "clipped to 2 token(s)" in printed
    assert "token counts withheld" in printed
    stats = load_statistics(dirs[0] / "gramfuse-stats.safetensors")
    assert stats.settings["privacy"] == {"epsilon": 4.0, "delta": None, "clip": 2.0, "mechanism": MECHANISM}
    assert stats.privacy["delta"] == 1 / 40 ** 2 and stats.noise_std > 0
    # Nothing in the file tells the examples' lengths: no token counts, no count of clipped examples.
    assert set(stats.token_counts.values()) == {40} and "clipped" not in json.dumps(stats.privacy)
    assert main(["merge", *map(str, dirs), "-o", str(tmp_path / "m"), "--quiet"]) == 0
    report = json.loads((tmp_path / "m" / "gramfuse-merge.json").read_text())
    layers = report["methods"]["regmean"]["layers"] if "methods" in report else report["layers"]
    solved = [entry for entry in layers.values() if entry.get("solver")]
    assert solved and all(entry["solver"] == NOISY_SOLVER for entry in solved)
    assert all(entry["noise_std"] == pytest.approx(math.sqrt(2) * stats.noise_std, rel=0.05) for entry in solved)
    assert [o.get("privacy", {}).get("epsilon") for o in report["owners"]] == [4.0, 4.0]


def test_dp_merge_of_identical_owners_gives_their_model_back(tmp_path):
    """Two sites of one model, on other data, each with its own noise: RegMean gives the model back."""
    dirs, data = make_owners(tmp_path, count=2)
    twin = tmp_path / "twin"
    twin.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if (dirs[0] / name).is_file():
            (twin / name).write_bytes((dirs[0] / name).read_bytes())
    for folder, data_file in zip((dirs[0], twin), data):
        assert main(["stats", str(folder), str(data_file), "--dp-epsilon", "1", "--quiet"]) == 0
    assert main(["merge", str(dirs[0]), str(twin), "-o", str(tmp_path / "m"), "--quiet"]) == 0
    from safetensors.torch import load_file

    merged, own = load_file(tmp_path / "m" / "model.safetensors"), load_file(dirs[0] / "model.safetensors")
    for name, value in own.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6)


def test_dp_merge_tends_to_the_clipped_merge_as_the_noise_vanishes(tmp_path):
    """With a vanishing noise (and so ridge) the noisy solve is RegMean on the clipped statistics."""
    dirs, data = make_owners(tmp_path)
    batches = [[encode([json.loads(line)["text"] for line in path.read_text().splitlines()])] for path in data]
    method, context = RegMean(), MergeContext()
    noisy, clean = Sums(), Sums()
    for folder, owner_batches in zip(dirs, batches):
        model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
        exact = clipped_grams(model, owner_batches, 1.0)[1]
        private = replace(exact, privacy={"noise_std": 1e-14})
        context.modules = exact.modules
        params = dict(model.state_dict())
        noisy.add(method.contribute(OwnerState(folder.name, params, private), context))
        clean.add(method.contribute(OwnerState(folder.name, params, exact), context))
    noisy_merge, clean_merge = method.combine(noisy, context), method.combine(clean, context)
    assert all(entry["solver"] == NOISY_SOLVER for entry in noisy_merge.layers.values())
    for name, value in clean_merge.params.items():
        torch.testing.assert_close(noisy_merge.params[name], value, rtol=1e-4, atol=1e-5)


def test_mixing_private_and_exact_statistics_is_refused(tmp_path, capsys):
    dirs, data = make_owners(tmp_path)
    assert main(["stats", str(dirs[0]), str(data[0]), "--dp-epsilon", "2", "--quiet"]) == 0
    assert main(["stats", str(dirs[1]), str(data[1]), "--quiet"]) == 0
    assert main(["merge", *map(str, dirs), "-o", str(tmp_path / "m"), "--quiet"]) != 0
    assert "1 of 2 owners' statistics are differentially private" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_statistics_file_checks_a_noisy_diagonal_against_the_noise(tmp_path):
    stats = collect_statistics(tiny_model("bert"), [encode(SENTENCES)], privacy=PrivacySpec(epsilon=1.0, seed=1))
    key = next(iter(stats.grams))
    save_statistics(stats, tmp_path / "ok.safetensors")
    assert load_statistics(tmp_path / "ok.safetensors").privacy == stats.privacy
    full = stats.full_gram(key)
    full[0, 0] = -20 * stats.noise_std  # no Gaussian draw goes this far
    stats.grams[key] = pack_upper(full)
    save_statistics(stats, tmp_path / "bad.safetensors")
    with pytest.raises(StatisticsError, match="negative diagonal"):
        load_statistics(tmp_path / "bad.safetensors")


def test_cli_refuses_what_it_cannot_make_private(tmp_path, capsys):
    dirs, data = make_owners(tmp_path, count=1)
    assert main(["stats", str(dirs[0]), str(data[0]), "--dp-epsilon", "1", "--fisher", "--quiet"]) != 0
    assert "Fisher is not clipped" in capsys.readouterr().err
    assert main(["stats", str(dirs[0]), str(data[0]), "--dp-delta", "1e-5", "--quiet"]) != 0
    assert "--dp-delta, --dp-clip or --dp-budget without --dp-epsilon" in capsys.readouterr().err
    assert main(["stats", str(dirs[0]), str(data[0]), "--dp-clip", "4", "--quiet"]) != 0
    assert "without --dp-epsilon" in capsys.readouterr().err
    assert main(["stats", str(dirs[0]), str(data[0]), "--dp-epsilon", "-1", "--quiet"]) != 0
    assert "epsilon must be between" in capsys.readouterr().err
    assert not (dirs[0] / "gramfuse-stats.safetensors").exists()


def test_the_budget_charges_each_draw_once_and_refuses_past_it(tmp_path):
    z = noise_multiplier(1.0, 1e-6)
    draw = {"draw": "a", "noise_multiplier": z, "delta": 1e-6, "epsilon": 1.0}
    budget = PrivacyBudget(tmp_path / "budget.json", epsilon_budget=1.7)
    assert budget.spend(draw) == pytest.approx(1.0, rel=0.01)
    assert budget.spend(draw) == pytest.approx(1.0, rel=0.01)  # the same noisy statistics again: free
    second = budget.spend({**draw, "draw": "b"})
    assert 1.4 < second < 1.5  # Gaussian composition: mu grows as sqrt(2), epsilon less than doubles
    with pytest.raises(PrivacyError, match="past its budget of 1.7"):  # a third draw would spend 1.81
        budget.spend({**draw, "draw": "c"})
    assert [d["draw"] for d in json.loads((tmp_path / "budget.json").read_text())] == ["a", "b"]
    # A larger delta buys no room: the total is taken at the smallest delta of any draw.
    with pytest.raises(PrivacyError, match="at delta 1e-06"):
        budget.spend({**draw, "draw": "d", "delta": 0.2})
    with pytest.raises(PrivacyError, match="malformed"):
        budget.spend({"draw": "e"})
    (tmp_path / "budget.json").write_text('[{"draw": "a"}, "an entry that is not a record"]')
    with pytest.raises(PrivacyError, match="not a list of draws; DP releases are refused"):
        budget.spend(draw)
    (tmp_path / "budget.json").write_text("{not json")
    with pytest.raises(PrivacyError, match="unreadable"):
        budget.spend(draw)


def test_offline_statistics_spend_the_datas_budget_and_a_draw_past_it_writes_nothing(tmp_path, capsys):
    """`gramfuse stats --dp-epsilon` charges the budget kept beside the data file, the one a federation site over
    that file spends from: a second draw past it is refused before its file is written."""
    dirs, data = make_owners(tmp_path, count=1)
    stats_file = dirs[0] / "gramfuse-stats.safetensors"
    assert main(["stats", str(dirs[0]), str(data[0]), "--dp-epsilon", "1", "--dp-budget", "1.5", "--quiet"]) == 0
    assert "epsilon 1 spent of 1.5" in capsys.readouterr().out
    record = data[0].with_name(data[0].name + ".gramfuse-dp-budget.json")
    first = json.loads(record.read_text())
    assert [d["draw"] for d in first] == [load_statistics(stats_file).privacy["draw"]]
    written = stats_file.read_bytes()
    assert main(["stats", str(dirs[0]), str(data[0]), "--dp-epsilon", "1", "--dp-budget", "1.5", "--quiet"]) != 0
    assert "past its budget of 1.5" in capsys.readouterr().err
    assert stats_file.read_bytes() == written and json.loads(record.read_text()) == first  # nothing drawn is kept
    assert sorted(p.name for p in dirs[0].iterdir() if "gramfuse-stats" in p.name) == ["gramfuse-stats.safetensors"]
    assert main(["stats", str(dirs[0]), str(data[0]), "--dp-budget", "3", "--quiet"]) != 0
    assert "without --dp-epsilon" in capsys.readouterr().err


def test_a_noisy_file_must_say_what_its_draw_cost(tmp_path):
    stats = collect_statistics(tiny_model("bert"), [encode(SENTENCES)], privacy=PrivacySpec(epsilon=1.0, seed=1))
    del stats.privacy["draw"]
    save_statistics(stats, tmp_path / "odd.safetensors")
    with pytest.raises(StatisticsError, match="privacy record lacks a valid draw"):
        load_statistics(tmp_path / "odd.safetensors")


def test_privatise_records_the_request_it_was_drawn_for():
    from fusion.privacy import privatise

    stats = collect_statistics(tiny_model("bert"), [encode(SENTENCES)], privacy=PrivacySpec(epsilon=1.0),
                               draw_noise=False)
    assert stats.noise_std == 0.0 and stats.clipped_examples == len(SENTENCES)
    privatise(stats, PrivacySpec(epsilon=8.0))
    assert stats.settings["privacy"]["epsilon"] == 8.0 and stats.privacy["epsilon"] == 8.0
    with pytest.raises(PrivacyError, match="only noise-free statistics"):
        privatise(stats, PrivacySpec(epsilon=8.0))  # noise on noise would be charged as one draw


def test_a_redrawn_owner_is_another_contribution_in_the_sums_ledger():
    from fusion.sumsfile import LedgerEntry

    model = tiny_model("bert")
    draws = [collect_statistics(model, [encode(SENTENCES)], privacy=PrivacySpec(epsilon=1.0)) for _ in range(2)]
    first, second = (LedgerEntry.of("o", "o", "weights", stats) for stats in draws)
    assert first.identity() != second.identity()  # subtracting one for the other would leave its noise behind
    assert second.redraw_of(first) and first.redraw_of(second) and not first.redraw_of(first)
    other_data = collect_statistics(model, [encode(SENTENCES[:-1])], privacy=PrivacySpec(epsilon=1.0))
    assert not LedgerEntry.of("o", "o", "weights", other_data).redraw_of(first)  # another data size: another owner
    # another request (or an earlier mechanism version) over the same data is that data drawn again all the same
    other_request = collect_statistics(model, [encode(SENTENCES)], privacy=PrivacySpec(epsilon=2.0))
    assert LedgerEntry.of("o", "o", "weights", other_request).redraw_of(first)
    exact = LedgerEntry.of("o", "o", "weights", collect_statistics(model, [encode(SENTENCES)]))
    assert not exact.redraw_of(first) and not first.redraw_of(exact)  # exact statistics are told apart by counts


def test_a_redrawn_owner_beside_its_first_draw_is_named_in_a_warning(tmp_path, caplog):
    """The same weights with the same DP request over as many examples, drawn twice: two sites of one model, or one
    site's data counted twice (the withheld token counts cannot tell). Merged, or added to sums holding the first
    draw, it is named in a warning; only the draw that went in can be removed."""
    import shutil

    dirs, data = make_owners(tmp_path)
    for folder, data_file in zip(dirs, data):
        assert main(["stats", str(folder), str(data_file), "--dp-epsilon", "4", "--quiet"]) == 0
    redrawn = tmp_path / "o0-again"
    shutil.copytree(dirs[0], redrawn)
    assert main(["stats", str(redrawn), str(data[0]), "--dp-epsilon", "4", "--dp-budget", "8", "--quiet"]) == 0
    warned = "owner 'o0-again' has the same weights and example count as owner 'o0'"
    with caplog.at_level("WARNING", logger="gramfuse"):
        assert main(["merge", *map(str, dirs), str(redrawn), "-o", str(tmp_path / "m"), "--quiet"]) == 0
    assert warned in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gramfuse"):
        assert main(["merge", *map(str, dirs), "-o", str(tmp_path / "m2"), "--save-sums", str(tmp_path / "sums"),
                     "--quiet"]) == 0
    assert "same weights" not in caplog.text  # two owners of their own: no warning, not even about themselves
    with caplog.at_level("WARNING", logger="gramfuse"):
        assert main(["merge", "--sums", str(tmp_path / "sums"), "--add", str(redrawn), "-o", str(tmp_path / "m3"),
                     "--quiet"]) == 0
    assert warned in caplog.text
    assert main(["merge", "--sums", str(tmp_path / "sums"), "--remove", str(redrawn), "-o", str(tmp_path / "m4"),
                 "--quiet"]) != 0  # only the draw that went in can come out


def test_the_server_refuses_to_mix_private_and_exact_sites():
    from server.plausibility import per_token_traces, privacy_misfits

    exact = {"statistics": {"grams": {"g": {"tokens": 10, "dim": 4}}}, "traces": {"g": 50.0}}
    private = {"statistics": {"grams": {"g": {"tokens": 10, "dim": 4}}, "privacy": {"noise_std": 3.0}},
               "traces": {"g": -20.0}}  # noise can take a small site's trace below zero
    assert set(privacy_misfits({1: exact, 2: exact, 3: private})) == {3}
    assert "differentially private, unlike" in privacy_misfits({1: exact, 2: exact, 3: private})[3]
    assert "exact, unlike" in privacy_misfits({1: private, 2: private, 3: exact})[3]
    assert privacy_misfits({1: private, 2: private}) == {}
    assert per_token_traces({1: exact, 2: private}) == {1: {"g": 5.0}}  # a DP trace is not judged


def test_the_server_rejects_a_dp_trace_that_clipping_and_noise_cannot_give():
    from server.plausibility import private_trace_misfits

    def site(trace, examples=10, clip=2.0, noise_std=3.0):
        multiplier = 3.0 / (2.0 * 2 ** 0.5)  # noise std = multiplier x clip x sqrt(2 x 1 Gram)
        return {"statistics": {"grams": {"g": {"tokens": examples, "dim": 4}}, "example_count": examples,
                               "privacy": {"noise_std": noise_std, "clip": clip, "noise_multiplier": multiplier}},
                "traces": {"g": trace}}

    slack = 10 * 3.0 * 2  # ten deviations of the trace's noise, sqrt(4) diagonal entries of std 3
    honest = {1: site(20.0), 2: site(-slack + 1), 3: site(2.0 * 10 + slack - 1)}
    assert private_trace_misfits(honest) == {}
    scaled = private_trace_misfits({1: site(20.0), 2: site(2.0 * 10 + slack + 1), 3: site(-slack - 1)})
    assert set(scaled) == {2, 3} and "outside the [-60, 80]" in scaled[2]
    assert "malformed" in private_trace_misfits({1: {"statistics": {"privacy": {"noise_std": 1.0}}}})[1]
    # the bound holds for the declared clip and noise: one clip for every site, and the noise its calibration gives
    odd = private_trace_misfits({1: site(20.0), 2: site(20.0), 3: site(20.0, clip=1e6)})
    assert set(odd) == {3} and "clip 1000000.0 differs from the other DP sites' 2.0" in odd[3]
    loud = private_trace_misfits({1: site(20.0), 2: site(1e6, noise_std=1e6)})
    assert set(loud) == {2} and "is not what its noise multiplier and clip give" in loud[2]


@pytest.mark.parametrize("seed", range(4))
def test_the_noise_ridge_keeps_a_margin_above_the_noises_spectral_edge(seed):
    """A Gram that is all noise (no data reaches the layer): with the ridge, every eigenvalue of the regularised
    Gram is at least about s sqrt(d), so the solve amplifies nothing by more than 1 / (s sqrt(d)); a ridge of the
    spectral edge alone (2 s sqrt(d)) leaves eigenvalues near zero."""
    generator = torch.Generator().manual_seed(seed)
    dim, std = 300, 0.7
    noise = unpack_upper(std * torch.randn(dim * (dim + 1) // 2, generator=generator, dtype=torch.float64), dim)
    edge = 2 * std * math.sqrt(dim)
    smallest = float(torch.linalg.eigvalsh(noise)[0])
    assert abs(smallest + edge) < 0.1 * edge  # Wigner: the spectrum reaches -2 s sqrt(d)
    ridge = noise_ridge(std ** 2, dim)
    assert smallest + ridge > 0.85 * std * math.sqrt(dim)
    assert abs(smallest + edge) < 0.15 * std * math.sqrt(dim)  # the edge alone would leave about nothing
