"""One contract over every registered merge method, as scikit-learn's estimator checks are: what any merge must do
whatever its maths, checked through the one streaming path of ``gramfuse merge`` (model folders in, folders out).

- the order of the owners does not matter;
- owners that are all the same model give that model back;
- splitting one owner's data in two (two owners with its weights) changes nothing for the count-weighted methods;
- every mode forms the same sums: streamed from folders (offline), folded whole (the plaintext server), and decoded
  from masked sums (the secure server).
"""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch
from helpers import perturbed, plaintext_aggregator, read_outputs, save_owner, secure_merge, tiny_model, write_data

from fusion.aggregate import owner_update
from fusion.checkpoint import load_model
from fusion.finish import restrict
from fusion.lazy import CheckpointFiles
from fusion.merge import load_base, merge_context, merge_folders, open_owner, owner_names, streamed_sums
from fusion.methods import METHODS, get_method
from fusion.secure import BODY, check_secure_methods
from fusion.statistics import load_statistics
from fusion.workflows import DataSettings, compute_statistics

SETTINGS = DataSettings(max_length=16, batch_size=8)
# Options under which each method gives back owners that are all one model: task arithmetic adds the owners' task
# vectors (so lambda = 1 / owners), TIES trims them (so keep everything).
IDENTITY_OPTIONS = {"task-arithmetic": {"scaling": 0.5}, "ties": {"density": 1.0, "scaling": 1.0}}
# Methods whose merge depends on the owners' data only through sums over examples (Grams, counts). Not Fisher: where
# no owner's Fisher informs a parameter (a position no example reached) it falls back to a plain average of owners.
COUNT_WEIGHTED = ["regmean", "weighted-average", "regmean++"]
DATA_FILES = {}  # owner folder -> the data file of its statistics


def with_statistics(folder, data):
    compute_statistics(folder, data, settings=SETTINGS, fisher=True, progress=False)
    DATA_FILES[folder.resolve()] = data


def every_method(federated: bool = False):
    """Every registered method (and RegMean's variants); ``federated``: those the federation serves (RegMean++ runs
    the owners' data through the merge, so it is offline only; the server's refusal is tested in tests/server)."""
    names = [name for name in sorted(METHODS) if not (federated and METHODS[name].needs_data)]
    return [*names, "regmean:alpha=0.5", "regmean:weighting=equal", *([] if federated else ["regmean++:alpha=0.5"])]


def method_of(spec: str, **options):
    name, _, option = spec.partition(":")
    if option:
        key, value = option.split("=")
        options[key] = float(value) if key == "alpha" else value
    return get_method(name, **options)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A base model and three owners fine-tuned from it (perturbed), each with statistics and Fisher; the first
    owner's data also split in two halves, each half with a folder of the same weights. In float64, forward pass
    included, so that the properties can be checked far below float32's rounding."""
    root = tmp_path_factory.mktemp("contract")
    base = tiny_model("bert").double()
    save_owner(base, root / "base")
    folders = {}
    for index in range(3):
        model = perturbed(base, seed=70 + index)
        folders[f"owner{index}"] = save_owner(model, root / f"owner{index}")
        data = write_data(root / f"data{index}.jsonl", 24 + 8 * index, seed=index)
        with_statistics(folders[f"owner{index}"], data)
    lines = (root / "data0.jsonl").read_text().splitlines(keepends=True)
    for half, part in (("a", lines[:10]), ("b", lines[10:])):
        folder = root / f"half-{half}"
        shutil.copytree(folders["owner0"], folder)
        (root / f"half-{half}.jsonl").write_text("".join(part))
        with_statistics(folder, root / f"half-{half}.jsonl")
        folders[f"half-{half}"] = folder
    return root, folders


def merged(folders, method, out, base):
    """The merged model's tensors, and the tolerance of each: 1e-10 relative, or for a layer solved from a summed
    Gram of condition c, c * 1e-14 (c = 1e12 where it is singular): rounding differences of the sums, at float64's
    1e-16, are amplified by the conditioning. The tiny random models' poolers and classifiers see nearly collapsed
    inputs (c up to 1e12)."""
    data = [data_of(folder) for folder in folders] if method.needs_data else ()
    report = merge_folders(folders, out, method, base_dir=base if method.needs_base else None, data=data,
                           data_settings=SETTINGS)
    tolerance = {}
    for layer in report["layers"].values():
        condition = float(layer["condition"]) if layer["condition"] != "inf" else 1e12
        for module in layer["modules"]:
            tolerance[f"{module}.weight"] = max(1e-10, 1e-14 * condition)
    return read_outputs(out)["."], tolerance


def data_of(folder):
    """The data file a folder's statistics were made from (a method that needs data is given it instead)."""
    return DATA_FILES[folder.resolve()]


def assert_equal(got, expected, tolerance=None):
    """Equal to ``tolerance`` (by tensor, default 1e-10) relative to each tensor's largest entry."""
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        scale = float(value.abs().max().clamp_min(1e-30))
        allowed = (tolerance or {}).get(name, 1e-10)
        assert float((got[name].double() - value.double()).abs().max()) <= allowed * scale, name


@pytest.mark.parametrize("spec", every_method())
def test_owner_order_does_not_matter(site, spec, tmp_path):
    root, folders = site
    method = method_of(spec)
    owners = [folders[f"owner{i}"] for i in range(3)]
    first, tolerance = merged(owners, method, tmp_path / "abc", root / "base")
    for order in itertools.islice(itertools.permutations(owners), 1, None, 2):
        assert_equal(merged(list(order), method, tmp_path / "order", root / "base")[0], first, tolerance)
        shutil.rmtree(tmp_path / "order")


@pytest.mark.parametrize("spec", every_method())
def test_owners_that_are_one_model_give_it_back(site, spec, tmp_path):
    root, folders = site
    name = spec.partition(":")[0]
    method = method_of(spec, **IDENTITY_OPTIONS.get(name, {}))
    twin = shutil.copytree(folders["owner1"], tmp_path / "twin")  # the same model at a site with other data
    with_statistics(twin, root / "data2.jsonl")
    result, tolerance = merged([folders["owner1"], twin], method, tmp_path / "out", root / "base")
    assert_equal(result, dict(CheckpointFiles(folders["owner1"])), tolerance)


@pytest.mark.parametrize("name", COUNT_WEIGHTED)
def test_splitting_an_owners_data_in_two_changes_nothing(site, name, tmp_path):
    root, folders = site
    method = get_method(name)
    whole, tolerance = merged([folders["owner0"], folders["owner1"]], method, tmp_path / "whole", root / "base")
    split, _ = merged([folders["half-a"], folders["half-b"], folders["owner1"]], method, tmp_path / "split",
                      root / "base")
    assert_equal(split, whole, tolerance)
    counts = [load_statistics(folders[n] / "gramfuse-stats.safetensors").example_count for n in ("half-a", "half-b")]
    assert sum(counts) == load_statistics(folders["owner0"] / "gramfuse-stats.safetensors").example_count


@pytest.mark.parametrize("spec", every_method(federated=True))
def test_every_mode_forms_the_same_sums(site, spec, tmp_path):
    """Offline (streamed per group from folders) = plaintext server (whole owners folded) = secure (decoded)."""
    root, folders = site
    method = method_of(spec)
    paths = [folders[f"owner{i}"] for i in range(3)]
    owners = [open_owner(name, path, True) for name, path in zip(owner_names(paths), paths)]
    base = load_base(root / "base") if method.needs_base else None
    context = merge_context(method, owners, base)
    updates = []
    for name, path in zip(owner_names(paths), paths):
        model, _ = load_model(path)
        updates.append(owner_update(name, model, load_statistics(path / "gramfuse-stats.safetensors")))
    plaintext = plaintext_aggregator(method, updates, base=base, diagonal=context.diagonal)
    streamed = streamed_sums(owners, set(), context)
    groups = plaintext.groups()
    assert {t for group in groups for t in group.tensors} == set(plaintext.dtypes)
    for group in groups:
        if group.head:
            continue
        expected = restrict(plaintext.body, group)
        got = streamed(method, group)
        assert got.keys() == expected.keys(), group.name
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-12, atol=0.0, msg=f"{group.name}: {key}")
    if method.needs_base:
        with pytest.raises(Exception, match="plaintext mode"):
            check_secure_methods([method])
        return
    sums, _, survivors = secure_merge([method], updates, tmp_path / "secure")
    assert len(survivors) == 3
    body = {key[len(f"0/{BODY}"):]: value for key, value in sums.items() if key.startswith(f"0/{BODY}")}
    assert body.keys() == plaintext.body.keys()
    for key, value in plaintext.body.items():
        scale = float(value.abs().max().clamp_min(1e-30))
        assert float((body[key] - value).abs().max()) <= 1e-9 * scale, key
