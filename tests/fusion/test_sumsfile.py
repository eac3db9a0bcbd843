"""Sums folders: owners added and removed exactly. For every method, removing an owner from the sums of three
gives the merge of the two others from scratch, and adding it back gives the merge of the three; the sums
themselves agree to float64 rounding. Owners not inside, already inside, another method's sums, another label set
or base: each an error naming it, nothing written."""

import json

import pytest
import torch
from helpers import assert_same_merge, perturbed, save_owner, tiny_model, write_data
from safetensors.torch import load_file

from fusion.cli import main as gramfuse
from fusion.errors import GramfuseError
from fusion.merge import merge_folders, merge_from_sums
from fusion.methods import METHODS, get_method
from fusion.sumsfile import SUMS_FILE, SumsFileError, SumsFolder

OWNERS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def owners(tmp_path_factory):
    root = tmp_path_factory.mktemp("sums-owners")
    base = tiny_model("bert")
    save_owner(base, root / "base")
    paths = {}
    for i, name in enumerate(OWNERS):
        model = save_owner(perturbed(base, seed=40 + i), root / name)
        data = write_data(root / f"{name}.jsonl", 24 + 8 * i, seed=i)
        assert gramfuse(["stats", str(model), str(data), "--fisher", "--quiet"]) == 0
        paths[name] = model
    return root, paths


def merge(method, models, out, **kwargs):
    return merge_folders([str(m) for m in models], out, method, device="cpu", **kwargs)


def stored_sums(folder) -> dict:
    return {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.startswith("copied/")}


def assert_same_sums(actual: dict, expected: dict) -> None:
    """The same sums, to float64 rounding relative to each sum's largest entry."""
    assert set(actual) == set(expected)
    for key, value in expected.items():
        scale = float(value.abs().max()) if value.numel() else 0.0
        assert torch.allclose(actual[key], value, rtol=0, atol=1e-12 * max(scale, 1.0)), key


METHOD_OPTIONS = {"regmean": {"alpha": 0.5}, "ties": {"density": 0.5}}


# Every method with sums: RegMean++'s Grams depend on every owner, so it has none (its refusal: test_plusplus.py).
@pytest.mark.parametrize("name", [name for name in sorted(METHODS) if not METHODS[name].needs_data])
def test_removing_and_adding_an_owner_equals_merging_from_scratch(owners, tmp_path, name):
    root, paths = owners
    method = get_method(name, **METHOD_OPTIONS.get(name, {}))
    base = {"base_dir": root / "base"} if method.needs_base else {}
    all_three, two = [paths[n] for n in OWNERS], [paths["alpha"], paths["beta"]]
    merge(method, all_three, tmp_path / "three", save_sums=tmp_path / "sums3", **base)
    merge(method, two, tmp_path / "two", save_sums=tmp_path / "sums2", **base)

    # gamma leaves: the merge of alpha and beta, as if gamma had never been merged
    report = merge_from_sums(tmp_path / "sums3", tmp_path / "removed", method, remove=[paths["gamma"]],
                             save_sums=tmp_path / "sums3-gamma", device="cpu", **base)
    assert report["sums"]["removed"] == ["gamma"] and [o["name"] for o in report["owners"]] == ["alpha", "beta"]
    assert_same_merge(tmp_path / "removed", tmp_path / "two", name)
    assert_same_sums(stored_sums(tmp_path / "sums3-gamma"), stored_sums(tmp_path / "sums2"))

    # gamma joins the two: the merge of the three, nobody else asked again
    merge_from_sums(tmp_path / "sums2", tmp_path / "added", method, add=[paths["gamma"]], device="cpu", **base)
    assert_same_merge(tmp_path / "added", tmp_path / "three", name)
    ledger = json.loads((tmp_path / "sums3-gamma" / SUMS_FILE).read_text())
    assert [o["name"] for o in ledger["owners"]] == ["alpha", "beta"]
    assert ledger["history"][-1] == {"added": [], "removed": ["gamma"]}


def test_a_merge_from_sums_loads_and_another_alpha_shares_them(owners, tmp_path):
    from transformers import AutoModelForSequenceClassification

    root, paths = owners
    regmean = get_method("regmean", alpha=0.5)
    merge(regmean, [paths[n] for n in OWNERS], tmp_path / "three", save_sums=tmp_path / "sums")
    merge(get_method("regmean", alpha=0.8), [paths["alpha"], paths["gamma"]], tmp_path / "scratch")
    merge_from_sums(tmp_path / "sums", tmp_path / "out", get_method("regmean", alpha=0.8), remove=[paths["beta"]])
    assert_same_merge(tmp_path / "out", tmp_path / "scratch")
    AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out"))  # a model transformers loads
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    # LiNeS on RegMean's task vector is chosen after the sums too: the sums formed against no base fit the base
    lines = get_method("regmean", alpha=0.8, lines_alpha=0.5, lines_beta=0.5)
    merge(lines, [paths["alpha"], paths["gamma"]], tmp_path / "lines-scratch", base_dir=root / "base")
    merge_from_sums(tmp_path / "sums", tmp_path / "lines", lines, remove=[paths["beta"]], base_dir=root / "base")
    assert_same_merge(tmp_path / "lines", tmp_path / "lines-scratch")


@pytest.fixture(scope="module")
def sums_of_two(owners, tmp_path_factory):
    root, paths = owners
    out = tmp_path_factory.mktemp("sums-two")
    merge(get_method("regmean"), [paths["alpha"], paths["beta"]], out / "merged", save_sums=out / "sums")
    return out / "sums"


def test_removing_an_owner_that_is_not_inside_names_it(owners, sums_of_two, tmp_path):
    _, paths = owners
    with pytest.raises(SumsFileError, match="owner 'gamma'.*is not inside"):
        merge_from_sums(sums_of_two, tmp_path / "out", get_method("regmean"), remove=[paths["gamma"]])
    assert not (tmp_path / "out").exists()


def test_adding_an_owner_already_inside_names_it(owners, sums_of_two, tmp_path):
    _, paths = owners
    with pytest.raises(SumsFileError, match=r"alpha\) is already inside .* as owner 'alpha'"):
        merge_from_sums(sums_of_two, tmp_path / "out", get_method("regmean"), add=[paths["alpha"]])
    assert not (tmp_path / "out").exists()


def test_another_methods_sums_are_refused(sums_of_two, tmp_path):
    with pytest.raises(SumsFileError, match="holds the sums of 'regmean'; method 'average' needs other sums"):
        merge_from_sums(sums_of_two, tmp_path / "out", get_method("average"))
    with pytest.raises(SumsFileError, match="no diag"):  # formed with alpha 1: no diag(G) W^T sums inside
        merge_from_sums(sums_of_two, tmp_path / "out", get_method("regmean", alpha=0.5))


def test_an_owner_of_another_label_set_is_refused(sums_of_two, tmp_path):
    other = save_owner(tiny_model("bert", num_labels=3), tmp_path / "topics")
    assert gramfuse(["stats", str(other), str(write_data(tmp_path / "t.jsonl", 16, seed=5, num_labels=3)),
                     "--quiet"]) == 0
    with pytest.raises(GramfuseError, match="owner 'topics': label set"):
        merge_from_sums(sums_of_two, tmp_path / "out", get_method("regmean"), add=[other])


def test_removing_every_owner_leaves_nothing(owners, sums_of_two, tmp_path):
    _, paths = owners
    with pytest.raises(SumsFileError, match="leaves nothing to merge"):
        merge_from_sums(sums_of_two, tmp_path / "out", get_method("regmean"), remove=[paths["alpha"], paths["beta"]])


def test_not_a_sums_folder_and_a_corrupt_ledger_are_clear_errors(owners, sums_of_two, tmp_path):
    _, paths = owners
    with pytest.raises(SumsFileError, match="not a sums folder"):
        SumsFolder(paths["alpha"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / SUMS_FILE).write_text('{"format": "gramfuse-sums/1", "owners": [{"name": 1}]}')
    with pytest.raises(SumsFileError, match="malformed"):
        SumsFolder(broken)


def test_the_cli_removes_an_owner_and_says_what_it_did(owners, sums_of_two, tmp_path, capsys):
    _, paths = owners
    assert gramfuse(["merge", "--sums", str(sums_of_two), "--remove", str(paths["beta"]), "-o", str(tmp_path / "out"),
                     "--save-sums", str(tmp_path / "left"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "merged 1 owners" in out and "removed beta" in out
    assert gramfuse(["merge", str(paths["alpha"]), "-o", str(tmp_path / "scratch"), "--quiet"]) == 0
    assert_same_merge(tmp_path / "out", tmp_path / "scratch")  # alpha alone: its pooler's Gram is near singular
    # owners with --sums, or --add without it: usage errors on stderr, exit 2
    for argv in (["merge", str(paths["alpha"]), "--sums", str(sums_of_two), "-o", str(tmp_path / "x")],
                 ["merge", str(paths["alpha"]), "--add", str(paths["beta"]), "-o", str(tmp_path / "x")],
                 ["merge", "-o", str(tmp_path / "x")]):
        with pytest.raises(SystemExit) as exited:
            gramfuse(argv)
        assert exited.value.code == 2
    assert "--sums" in capsys.readouterr().err
