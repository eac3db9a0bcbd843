"""The engine on the bundled real model and real data: two owners of all-MiniLM-L6-v2, each fine-tuned briefly on
a few hundred real VADER snippets of its own domain, then statistics and merge through the CLI."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from clients.finetune import FinetuneSettings, finetune
from examples.assets import minilm_dir, split, vader, write_jsonl
from fusion.cli import main
from fusion.statistics import unpack_upper
from fusion.methods.regmean import transposed
from fusion.statistics import load_statistics

pytestmark = pytest.mark.real
DOMAINS = ("amazon", "movies")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    owners, tests = [], []
    for seed, domain in enumerate(DOMAINS):
        train_rows, test_rows = split(vader(domain), seed=0, train=320, test=200)
        train = write_jsonl(train_rows, root / f"{domain}-train.jsonl")
        tests.append(write_jsonl(test_rows, root / f"{domain}-test.jsonl"))
        settings = FinetuneSettings(labels=("negative", "positive"), epochs=2, learning_rate=2e-4, seed=seed)
        owner = finetune(minilm_dir(), train, root / domain, settings, progress=False)
        assert main(["stats", str(owner), str(train), "--max-length", "64", "--quiet"]) == 0
        owners.append(owner)
    for method in ("regmean", "average"):
        assert main(["merge", *map(str, owners), "-o", str(root / method), "--method", method, "--quiet"]) == 0
    return root, owners, tests


def test_statistics_of_the_real_model(federation):
    _, owners, _ = federation
    stats = load_statistics(owners[0] / "gramfuse-stats.safetensors")
    assert stats.example_count == 320
    # six layers, each with query/key/value sharing one Gram; the FFN output layer sees the 1536-wide activations
    assert len(stats.modules) - len(stats.grams) == 12
    assert stats.dims["bert.encoder.layer.5.output.dense"] == 1536
    tokens = stats.token_counts["bert.encoder.layer.0.attention.self.query"]
    assert 320 * 3 < tokens <= 320 * 64  # real tokens only: no pads, truncated at 64
    assert stats.token_counts["classifier"] == 320


def layer_objective(gram, owners_weights_t, merged_t):
    return float(sum(torch.trace((merged_t - w).T @ g @ (merged_t - w)) for g, w in zip(gram, owners_weights_t)))


def test_regmean_beats_averaging_on_every_layers_own_objective(federation):
    """Per layer, RegMean minimises sum_i ||X_i W^T - X_i W_i^T||^2 = sum_i tr((W - W_i) G_i (W - W_i)^T)."""
    root, owners, _ = federation
    stats = [load_statistics(owner / "gramfuse-stats.safetensors") for owner in owners]
    states = [AutoModelForSequenceClassification.from_pretrained(str(o)).state_dict() for o in owners]
    regmean = AutoModelForSequenceClassification.from_pretrained(str(root / "regmean")).state_dict()
    average = AutoModelForSequenceClassification.from_pretrained(str(root / "average")).state_dict()
    improved = 0
    for module, info in stats[0].modules.items():
        grams = [unpack_upper(s.grams[info.gram], s.dims[info.gram]) for s in stats]
        targets = [transposed(state[info.weight], info.kind).double() for state in states]
        ours = layer_objective(grams, targets, transposed(regmean[info.weight], info.kind).double())
        theirs = layer_objective(grams, targets, transposed(average[info.weight], info.kind).double())
        assert ours <= theirs * (1 + 1e-6), module
        improved += ours < 0.9 * theirs
    assert improved >= len(stats[0].modules) // 2


def test_merged_model_loads_and_serves_both_domains(federation, capsys):
    root, _, tests = federation
    report = json.loads((root / "regmean" / "gramfuse-merge.json").read_text())
    assert len(report["layers"]) == 6 * 4 + 2  # q/k/v, attention output, FFN in, FFN out per layer; pooler; head
    capsys.readouterr()
    for test_file in tests:
        assert main(["evaluate", str(root / "regmean"), str(test_file), "--json", "--quiet"]) == 0
        scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        print(test_file.name, scores)
        assert scores["examples"] == 200
        assert scores["accuracy"] > 0.6  # well above chance on held-out real snippets of both domains


def test_secure_merge_of_the_real_owners_equals_plaintext(federation, tmp_path):
    """The secure path (fixed point, masks, unmasking) on the real owners gives the plaintext merge, to the limits
    of 64-bit fixed point: about 2^-57 of each summed tensor's largest entry, amplified by the solve."""
    from helpers import plaintext_merge, secure_merge

    from fusion.aggregate import owner_update
    from fusion.checkpoint import load_model
    from fusion.methods import get_method

    _, owners, _ = federation
    updates = [owner_update(o.name, load_model(o)[0], load_statistics(o / "gramfuse-stats.safetensors"))
               for o in owners]
    method = get_method("regmean")
    _, merged, _ = secure_merge([method], updates, tmp_path / "secure")
    expected = plaintext_merge(method, updates, tmp_path / "plaintext")["."]
    worst = max(float((merged["regmean"]["."][name] - value).abs().max() / value.abs().max())
                for name, value in expected.items())
    print(f"largest relative difference, secure to plaintext, real MiniLM: {worst:.2e}")
    assert worst <= 1e-9


def test_removing_a_real_owner_from_the_sums_equals_never_having_merged_it(federation, tmp_path, capsys):
    """Unlearning on the real owners: the merge of both with its sums saved, then the movies owner removed from the
    sums, equals merging the amazon owner alone from scratch, and serves its domain as well."""
    from helpers import assert_same_merge

    _, owners, tests = federation
    amazon, movies = map(str, owners)
    assert main(["merge", amazon, movies, "-o", str(tmp_path / "both"), "--save-sums", str(tmp_path / "sums"),
                 "--quiet"]) == 0
    assert main(["merge", "--sums", str(tmp_path / "sums"), "--remove", movies, "-o", str(tmp_path / "without"),
                 "--quiet"]) == 0
    assert main(["merge", amazon, "-o", str(tmp_path / "alone"), "--quiet"]) == 0
    assert_same_merge(tmp_path / "without", tmp_path / "alone")
    capsys.readouterr()
    scores = {}
    for name in ("without", "alone"):
        assert main(["evaluate", str(tmp_path / name), str(tests[0]), "--json", "--max-length", "64", "--quiet"]) == 0
        scores[name] = json.loads(capsys.readouterr().out)["accuracy"]
    assert scores["without"] == scores["alone"]


def test_forgetting_report_of_the_real_merge(federation, tmp_path):
    """What the RegMean merge keeps of each real owner on its held-out domain: near everything (the merge serves
    both domains), and representations close to each owner's early on, diverging with depth."""
    root, owners, tests = federation
    pairs = [arg for owner, test in zip(owners, tests) for arg in ("--owner", str(owner), str(test))]
    assert main(["report", str(root / "regmean"), *pairs, "--max-length", "64", "-o", str(tmp_path / "report.json"),
                 "--chart", str(tmp_path / "chart.png"), "--quiet"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    print(json.dumps([{k: o[k] for k in ("owner", "merged", "own", "retention")} | {"cka": o["cka"]}
                      for o in report["owners"]]))
    for owner in report["owners"]:
        assert owner["score"] == "accuracy" and owner["examples"] == 200
        assert 0.8 < owner["retention"] < 1.2
        assert len(owner["cka"]) == 7 and all(0.0 <= c <= 1.0 + 1e-9 for c in owner["cka"])
        assert owner["cka"][0] > 0.99  # the embeddings' output: fine-tuning barely moves it
    assert (tmp_path / "chart.png").is_file()


def test_regmean_plusplus_on_the_real_owners_sees_the_merged_models_inputs(federation, tmp_path, capsys):
    """RegMean++ on the real owners and their training data: each unit's Grams are taken on the inputs the merge
    before it produces, so every Gram of a unit's *input* (each block's query/key/value, the pooler, the classifier)
    equals the Gram of that layer in the final merged model on the owner's data, which `gramfuse stats` computes
    from the output folder with nothing of RegMean++; the merge itself serves both domains."""
    from fusion.merge import open_owner, plusplus_owners
    from fusion.methods import get_method
    from fusion.statistics import load_statistics
    from fusion.workflows import DataSettings

    root, owners, tests = federation
    trains = [root / f"{domain}-train.jsonl" for domain in DOMAINS]
    out = tmp_path / "plusplus"
    assert main(["merge", *map(str, owners), "-o", str(out), "--method", "regmean++", "--data", *map(str, trains),
                 "--max-length", "64", "--quiet"]) == 0
    report = json.loads((out / "gramfuse-merge.json").read_text())
    assert report["method"] == "regmean++" and report["regmean++"]["examples"] == {"amazon": 320, "movies": 320}

    opened = [open_owner(domain, owner, False) for domain, owner in zip(DOMAINS, owners)]
    plusplus_owners(opened, trains, get_method("regmean++"), {o.name: o.files.fingerprint() for o in opened},
                    DataSettings(max_length=64), None, "cpu", None)
    inputs = ["bert.pooler.dense", "classifier"] + [f"bert.encoder.layer.{i}.attention.self.query" for i in range(6)]
    for owner, train in zip(opened, trains):
        merged_stats = tmp_path / f"merged-{owner.name}.safetensors"
        assert main(["stats", str(out), str(train), "-o", str(merged_stats), "--max-length", "64", "--quiet"]) == 0
        expected = load_statistics(merged_stats)
        for layer in inputs:
            got = owner.statistics.grams[owner.statistics.modules[layer].gram]
            want = expected.grams[expected.modules[layer].gram]
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max())), (owner.name, layer)
        inner = owner.statistics.modules["bert.encoder.layer.5.output.dense"].gram  # the owner's own block feeds it
        assert not torch.allclose(owner.statistics.grams[inner], expected.grams[inner], rtol=1e-3)

    capsys.readouterr()
    for test_file in tests:
        assert main(["evaluate", str(out), str(test_file), "--json", "--max-length", "64", "--quiet"]) == 0
        scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        print(test_file.name, "regmean++", scores)
        assert scores["accuracy"] > 0.6  # both domains served (each owner's own model scores about 0.75 on its own)



def test_differentially_private_statistics_of_the_real_owners(federation, tmp_path, capsys):
    """(4, 1/N^2)-DP statistics of the real owners (clipped, noised once at each site) merge into a model that still
    serves both domains; every solved layer is regularised by the noise's ridge, and the noise is what was promised."""
    root, owners, tests = federation
    sites = []
    for domain, owner in zip(DOMAINS, owners):
        site = tmp_path / domain  # the owner's model, linked, so its exact statistics stay for the other tests
        site.mkdir()
        for item in owner.iterdir():
            if item.name != "gramfuse-stats.safetensors":
                (site / item.name).symlink_to(item)
        assert main(["stats", str(site), str(root / f"{domain}-train.jsonl"), "--max-length", "64",
                     "--dp-epsilon", "4", "--quiet"]) == 0
        stats = load_statistics(site / "gramfuse-stats.safetensors")
        assert stats.privacy["delta"] == 1 / 320 ** 2 and stats.privacy["grams"] == 6 * 4 + 2
        assert set(stats.token_counts.values()) == {320}  # no token counts: they would tell the lengths
        sites.append(site)
    assert main(["merge", *map(str, sites), "-o", str(tmp_path / "dp"), "--quiet"]) == 0
    report = json.loads((tmp_path / "dp" / "gramfuse-merge.json").read_text())
    assert {layer["solver"] for layer in report["layers"].values()} == {"cholesky+noise-ridge"}
    capsys.readouterr()
    for test_file in tests:
        assert main(["evaluate", str(tmp_path / "dp"), str(test_file), "--json", "--quiet"]) == 0
        scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert scores["accuracy"] > 0.6, test_file.name
