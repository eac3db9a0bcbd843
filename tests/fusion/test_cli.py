"""The `gramfuse` CLI end to end on tiny BERT, DistilBERT and GPT-2 federations, and its errors."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import (
    kinds_of,
    layer_inputs,
    module_weight,
    perturbed,
    pooled_least_squares,
    pooled_objective,
    save_owner,
    tiny_model,
    tokenizer,
    weight_t,
    write_data,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from fusion.cli import main


def gramfuse(*args):
    return main([*map(str, args), "--quiet"])


def make_federation(tmp_path, kind, owners=2, examples=40, num_labels=2, **overrides):
    base = tiny_model(kind, num_labels=num_labels, **overrides)
    save_owner(base, tmp_path / "base")
    dirs, data = [], []
    for i in range(owners):
        dirs.append(save_owner(perturbed(base, seed=10 + i), tmp_path / f"owner{i}"))
        data.append(write_data(tmp_path / f"data{i}.jsonl", examples, seed=i, num_labels=num_labels))
    return dirs, data


def texts_of(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("kind", ["bert", "distilbert", "gpt2"])
def test_stats_then_regmean_reproduces_the_pooled_least_squares_optimum(tmp_path, kind):
    dirs, data = make_federation(tmp_path, kind, owners=3)
    for model_dir, data_file in zip(dirs, data):
        assert gramfuse("stats", model_dir, data_file) == 0
        assert (model_dir / "gramfuse-stats.safetensors").is_file()
    assert gramfuse("merge", *dirs, "-o", tmp_path / "merged", "--method", "regmean") == 0
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
    owners = [AutoModelForSequenceClassification.from_pretrained(str(d)).eval() for d in dirs]
    inputs = []
    for owner, data_file in zip(owners, data):
        batch = dict(tokenizer()(texts_of(data_file), padding=True, truncation=True, max_length=128,
                                 return_tensors="pt"))
        inputs.append(layer_inputs(owner, [batch]))
    kinds = kinds_of(merged)
    assert kinds
    for module, kind_of in kinds.items():
        xs = [owner_inputs[module] for owner_inputs in inputs]
        targets = [weight_t(module_weight(owner, module), kind_of) for owner in owners]
        optimum = pooled_objective(xs, targets, pooled_least_squares(xs, targets))
        achieved = pooled_objective(xs, targets, weight_t(module_weight(merged, module), kind_of))
        assert achieved - optimum <= 1e-6 * optimum, module
    report = json.loads((tmp_path / "merged" / "gramfuse-merge.json").read_text())
    assert report["method"] == "regmean" and len(report["owners"]) == 3
    # Every Gram is solved and reported; a rank-deficient one (a ReLU'd head input) is regularised, and said so.
    assert all(layer["solver"] in ("cholesky", "cholesky+ridge") for layer in report["layers"].values())
    regularised = [key for key, layer in report["layers"].items() if layer["solver"] != "cholesky"]
    assert all(any(key in warning for warning in report["warnings"]) for key in regularised)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


@pytest.mark.parametrize("method", ["average", "weighted-average", "fisher", "task-arithmetic", "ties"])
def test_every_method_through_the_cli(tmp_path, method):
    dirs, data = make_federation(tmp_path, "bert")
    for model_dir, data_file in zip(dirs, data):
        assert gramfuse("stats", model_dir, data_file, "--fisher") == 0
    extra = ["--base", tmp_path / "base"] if method in ("task-arithmetic", "ties") else []
    assert gramfuse("merge", *dirs, "-o", tmp_path / "out", "--method", method, *extra) == 0
    assert gramfuse("evaluate", tmp_path / "out", data[0]) == 0


def test_average_by_cli_is_the_mean_of_the_weights(tmp_path):
    dirs, _ = make_federation(tmp_path, "distilbert")
    assert gramfuse("merge", *dirs, "-o", tmp_path / "out", "--method", "average") == 0
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    owners = [load_file(str(d / "model.safetensors")) for d in dirs]
    for name, value in merged.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (owners[0][name] + owners[1][name]) / 2)


def test_different_label_sets_give_one_folder_per_owner_with_its_own_head(tmp_path):
    base = tiny_model("bert")
    two = perturbed(base, seed=1)
    three = tiny_model("bert", num_labels=3)
    three.bert.load_state_dict(perturbed(base, seed=2).bert.state_dict())
    dirs = [save_owner(two, tmp_path / "sentiment"), save_owner(three, tmp_path / "topics")]
    data = [write_data(tmp_path / "a.jsonl", 30, 0, 2), write_data(tmp_path / "b.csv", 30, 1, 3, fmt="csv")]
    for model_dir, data_file in zip(dirs, data):
        assert gramfuse("stats", model_dir, data_file) == 0
    assert gramfuse("merge", *dirs, "-o", tmp_path / "out") == 0
    loaded = {name: AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out" / name))
              for name in ("sentiment", "topics")}
    assert loaded["topics"].config.num_labels == 3 and loaded["sentiment"].config.num_labels == 2
    torch.testing.assert_close(loaded["topics"].classifier.weight, three.classifier.weight)
    torch.testing.assert_close(loaded["sentiment"].classifier.weight, two.classifier.weight)
    body = "encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(loaded["topics"].bert.state_dict()[body], loaded["sentiment"].bert.state_dict()[body])
    assert gramfuse("evaluate", tmp_path / "out" / "topics", data[1]) == 0


def test_help_on_every_command_and_errors_on_stderr():
    for args in (["--help"], ["stats", "--help"], ["merge", "--help"], ["evaluate", "--help"]):
        done = subprocess.run([sys.executable, "-m", "fusion.cli", *args], capture_output=True, text=True)
        assert done.returncode == 0 and "usage: gramfuse" in done.stdout
    done = subprocess.run([sys.executable, "-m", "fusion.cli", "merge", "x", "-o", "y", "--method", "average",
                           "--alpha", "0.5"], capture_output=True, text=True)
    assert done.returncode == 1
    assert "gramfuse: error: --alpha does not apply to method 'average'" in done.stderr and done.stdout == ""


def expect_error(capsys, args, *fragments):
    assert gramfuse(*args) == 1
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_owners_of_different_shapes(tmp_path, capsys):
    dirs, data = make_federation(tmp_path, "bert")
    wide = save_owner(tiny_model("bert", intermediate_size=32), tmp_path / "wide")
    for model_dir, data_file in zip([dirs[0], wide], data):
        gramfuse("stats", model_dir, data_file)
    expect_error(capsys, ["merge", dirs[0], wide, "-o", tmp_path / "out"],
                 "owner 'wide'", "layer 'bert.encoder.layer.0.intermediate.dense.", "(32", "(24")
    assert not (tmp_path / "out").exists()


def test_owners_of_different_architectures(tmp_path, capsys):
    dirs, _ = make_federation(tmp_path, "bert")
    other = save_owner(tiny_model("distilbert"), tmp_path / "distil")
    expect_error(capsys, ["merge", dirs[0], other, "-o", tmp_path / "out", "--method", "average"],
                 "owner 'distil'", "model type 'distilbert'")


def test_statistics_made_from_other_weights(tmp_path, capsys):
    dirs, data = make_federation(tmp_path, "bert")
    gramfuse("stats", dirs[0], data[0])
    shutil.copy(dirs[0] / "gramfuse-stats.safetensors", dirs[1] / "gramfuse-stats.safetensors")
    expect_error(capsys, ["merge", *dirs, "-o", tmp_path / "out"], "owner 'owner1'", "other weights")


def test_missing_statistics_file(tmp_path, capsys):
    dirs, data = make_federation(tmp_path, "bert")
    gramfuse("stats", dirs[0], data[0])
    expect_error(capsys, ["merge", *dirs, "-o", tmp_path / "out"], "owner1", "no statistics file")


def test_invalid_utf8_in_a_csv_names_its_line(tmp_path, capsys):
    dirs, _ = make_federation(tmp_path, "bert", owners=1)
    data_file = tmp_path / "bad.csv"
    data_file.write_bytes(b"text,label\nfine,0\nbad \xff byte,1\n")
    expect_error(capsys, ["stats", dirs[0], data_file], "bad.csv:3", "not valid UTF-8")


def rewrite_statistics(path, meta_edit=None, tensor_edit=None):
    """Rewrite a statistics file as a careless or hostile tool might have written it."""
    from safetensors import safe_open

    from fusion.statistics import METADATA_KEY, read_metadata

    meta = read_metadata(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if meta_edit:
        meta_edit(meta)
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})


def _first_gram(meta):
    return next(iter(meta["grams"].values()))


@pytest.mark.parametrize(("meta_edit", "tensor_edit", "fragments"), [
    (lambda m: m.update(example_count=0), None, ["example count is 0, below 1"]),
    (lambda m: m.update(example_count=-3), None, ["example count is -3"]),
    (lambda m: m.update(example_count=12.5), None, ["example count is 12.5, not a whole number"]),
    (lambda m: _first_gram(m).update(tokens=0), None, ["token count is 0", "every example has a real token"]),
    (lambda m: _first_gram(m).update(tokens=3.25), None, ["token count is 3.25, not a whole number"]),
    (None, lambda t: t.update({k: v.half() for k, v in t.items() if k.startswith("gram.")}), ["Gram stored as F16"]),
    (None, lambda t: t.update({k: v.long() for k, v in t.items() if k.startswith("gram.")}), ["Gram stored as I64"]),
    (None, lambda t: t.update({k: -v for k, v in t.items() if k.startswith("gram.")}), ["negative diagonal"]),
    (lambda m: [i.update(kind="conv1d") for i in m["modules"].values()], None, ["is a linear layer in the model",
                                                                             "statistics say conv1d"]),
])
def test_implausible_statistics_are_refused_naming_owner_and_problem(tmp_path, capsys, meta_edit, tensor_edit,
                                                                    fragments):
    dirs, data = make_federation(tmp_path, "bert")
    for model_dir, data_file in zip(dirs, data):
        assert gramfuse("stats", model_dir, data_file) == 0
    rewrite_statistics(dirs[1] / "gramfuse-stats.safetensors", meta_edit, tensor_edit)
    expect_error(capsys, ["merge", *dirs, "-o", tmp_path / "out"], "owner 'owner1'", *fragments)
    assert not (tmp_path / "out").exists()


def test_statistics_of_another_model_width_are_refused(tmp_path, capsys):
    dirs, data = make_federation(tmp_path, "bert")
    wider = make_federation(tmp_path / "wider", "bert", owners=1, hidden_size=32, intermediate_size=48)[0][0]
    for model_dir, data_file in zip([dirs[0], wider], data):
        assert gramfuse("stats", model_dir, data_file) == 0
    (dirs[1] / "gramfuse-stats.safetensors").write_bytes((wider / "gramfuse-stats.safetensors").read_bytes())
    rewrite_statistics(dirs[1] / "gramfuse-stats.safetensors",
                       lambda m: m.update(fingerprint=gramfuse_fingerprint(dirs[1])))
    expect_error(capsys, ["merge", *dirs, "-o", tmp_path / "out"], "owner 'owner1'", "has dimension 32",
                 "input is 16 wide")


@pytest.mark.parametrize("again", ["same", "slash", "link", "copy"])
def test_one_owner_given_twice_is_an_error_however_it_is_named(tmp_path, capsys, again):
    import shutil

    dirs, data = make_federation(tmp_path, "bert")
    for model_dir, data_file in zip(dirs, data):
        assert gramfuse("stats", model_dir, data_file) == 0
    (tmp_path / "link").symlink_to(dirs[0], target_is_directory=True)
    shutil.copytree(dirs[0], tmp_path / "copy")
    twice = {"same": dirs[0], "slash": f"{dirs[0]}/", "link": tmp_path / "link", "copy": tmp_path / "copy"}[again]
    expect_error(capsys, ["merge", dirs[0], dirs[1], twice, "-o", tmp_path / "out"], "owner0", "give each owner once")
    assert not (tmp_path / "out").exists()


def test_owners_with_different_tokenizers_are_an_error(tmp_path, capsys):
    dirs, data = make_federation(tmp_path, "bert")
    for model_dir, data_file in zip(dirs, data):
        assert gramfuse("stats", model_dir, data_file) == 0
    vocab = dirs[1] / "vocab.txt"
    if vocab.is_file():
        vocab.write_text(vocab.read_text().replace("\nmovie\n", "\nfilm2\n", 1))
    tokenizer_json = dirs[1] / "tokenizer.json"
    config = json.loads(tokenizer_json.read_text())
    config["model"]["vocab"]["film2"] = config["model"]["vocab"].pop("movie")
    tokenizer_json.write_text(json.dumps(config))
    expect_error(capsys, ["merge", *dirs, "-o", tmp_path / "out"], "owner 'owner1'", "tokenizer", "differs",
                 "'owner0'")


def test_statistics_of_different_max_lengths_are_merged_with_a_warning(tmp_path, caplog):
    dirs, data = make_federation(tmp_path, "bert")
    assert gramfuse("stats", dirs[0], data[0], "--max-length", "16") == 0
    assert gramfuse("stats", dirs[1], data[1], "--max-length", "32") == 0
    assert gramfuse("merge", *dirs, "-o", tmp_path / "out") == 0
    assert "owners 'owner0' and 'owner1' made their statistics with --max-length 16 and 32" in caplog.text


def test_a_full_disk_is_a_clear_error_and_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    """The disk fills while the merged shard, then the statistics file, is written (a write that fails as a full
    disk fails: the bytes so far are on disk)."""
    import errno

    from fusion import checkpoint

    dirs, data = make_federation(tmp_path, "bert")
    for model_dir, data_file in zip(dirs, data):
        assert gramfuse("stats", model_dir, data_file) == 0
    real_add = checkpoint.TensorFile.add

    def filling_up_after(limit):
        def add(shard, name, value):
            real_add(shard, name, value)
            if shard.size > limit:
                raise OSError(errno.ENOSPC, "No space left on device", str(shard.data_path))
        return add

    monkeypatch.setattr(checkpoint.TensorFile, "add", filling_up_after(100_000))
    expect_error(capsys, ["merge", *dirs, "-o", tmp_path / "out"], "no space left on the device",
                 "no output was left half-written")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base", "owner0", "owner1", "data0.jsonl",
                                                                 "data1.jsonl"])

    # the statistics file is written tensor by tensor too: the disk fills after its first Gram
    monkeypatch.setattr(checkpoint.TensorFile, "add", filling_up_after(0))
    before = sorted(p.name for p in dirs[0].iterdir())
    expect_error(capsys, ["stats", dirs[0], data[0], "--output", dirs[0] / "again.safetensors"], "no space left")
    assert sorted(p.name for p in dirs[0].iterdir()) == before


def gramfuse_fingerprint(model_dir):
    from fusion.lazy import CheckpointFiles

    return CheckpointFiles(model_dir).fingerprint()


def test_corrupt_statistics_file(tmp_path, capsys):
    dirs, data = make_federation(tmp_path, "bert")
    for model_dir, data_file in zip(dirs, data):
        gramfuse("stats", model_dir, data_file)
    stats_file = dirs[1] / "gramfuse-stats.safetensors"
    stats_file.write_bytes(stats_file.read_bytes()[:-100])
    expect_error(capsys, ["merge", *dirs, "-o", tmp_path / "out"], "owner1", "corrupt or truncated")
    assert not (tmp_path / "out").exists()


def test_nan_in_weights(tmp_path, capsys):
    dirs, data = make_federation(tmp_path, "bert")
    weights = load_file(str(dirs[1] / "model.safetensors"))
    name = "bert.encoder.layer.1.output.dense.weight"
    weights[name][0, 0] = float("inf")
    save_file(weights, str(dirs[1] / "model.safetensors"), metadata={"format": "pt"})
    expect_error(capsys, ["stats", dirs[1], data[1]], name, "NaN or Inf")
    gramfuse("stats", dirs[0], data[0])
    expect_error(capsys, ["merge", *dirs, "-o", tmp_path / "out", "--method", "average"],
                 "owner 'owner1'", name, "NaN or Inf")


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("", ["no examples (the file is empty)"]),
        ('{"text": "fine", "label": 0}\n{"text": broken\n', [":2:", "not valid JSON"]),
        ('{"text": "fine", "label": 0}\n{"sentence": "x", "label": 1}\n', [":2:", "missing field 'text'"]),
        ('{"text": "fine", "label": 0}\n{"text": "x", "label": 7}\n', [":2:", "label 7 is outside the model's range 0..1"]),
        ('{"text": "fine", "label": "sideways"}\n', [":1:", "label 'sideways'"]),
        ('["a list"]\n', [":1:", "expected a JSON object"]),
        ('{"text": "fine", "label": Infinity}\n', [":1:", "label inf"]),
        ('{"text": "fine", "label": NaN}\n', [":1:", "label nan"]),
        (b'{"text": "fine", "label": 0}\n{"text": "caf\xe9", "label": 1}\n', [":2:", "not valid UTF-8", "byte 14"]),
    ],
)
def test_bad_data_files(tmp_path, capsys, content, fragments):
    dirs, _ = make_federation(tmp_path, "bert", owners=1)
    data_file = tmp_path / "bad.jsonl"
    data_file.write_bytes(content if isinstance(content, bytes) else content.encode())
    expect_error(capsys, ["stats", dirs[0], data_file], "bad.jsonl", *fragments)
    assert not (dirs[0] / "gramfuse-stats.safetensors").exists()


def test_evaluate_needs_labels_and_csv_field_names_are_settable(tmp_path, capsys):
    dirs, _ = make_federation(tmp_path, "bert", owners=1)
    data_file = tmp_path / "d.csv"
    data_file.write_text("sentence,y\ngood movie,1\nawful,0\n")
    assert gramfuse("stats", dirs[0], data_file, "--text-field", "sentence", "--label-field", "y") == 0
    assert gramfuse("evaluate", dirs[0], data_file, "--text-field", "sentence", "--label-field", "y", "--json") == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["examples"] == 2 and 0.0 <= scores["accuracy"] <= 1.0
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text('{"text": "no label here"}\n')
    assert gramfuse("stats", dirs[0], unlabelled) == 0  # Grams need no labels
    expect_error(capsys, ["evaluate", dirs[0], unlabelled], "u.jsonl:1", "missing field 'label'")


def test_existing_output_is_not_overwritten_without_asking(tmp_path, capsys):
    dirs, _ = make_federation(tmp_path, "bert")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    expect_error(capsys, ["merge", *dirs, "-o", tmp_path / "out", "--method", "average"], "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert gramfuse("merge", *dirs, "-o", tmp_path / "out", "--method", "average", "--overwrite") == 0
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("where, relation", [("owner", "is"), ("link", "is"), ("root", "contains"),
                                             ("inside", "lies inside")])
def test_an_output_among_the_inputs_is_refused_even_with_overwrite(tmp_path, capsys, where, relation):
    dirs, data = make_federation(tmp_path / "root", "bert")
    (tmp_path / "link").symlink_to(dirs[0], target_is_directory=True)
    out = {"owner": dirs[0], "link": tmp_path / "link", "root": tmp_path / "root",
           "inside": dirs[1] / "merged"}[where]
    before = sorted(p.name for p in dirs[0].iterdir())
    expect_error(capsys, ["merge", *dirs, "-o", out, "--method", "average", "--overwrite"],
                 f"the output folder {relation} the input", "apart from the inputs")
    assert sorted(p.name for p in dirs[0].iterdir()) == before and data[0].is_file()
    assert not (dirs[1] / "merged").exists()


def test_an_output_path_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    dirs, _ = make_federation(tmp_path, "bert")
    (tmp_path / "out").write_text("not a folder")
    expect_error(capsys, ["merge", *dirs, "-o", tmp_path / "out", "--method", "average", "--overwrite"],
                 "is a file, not a folder")
    assert (tmp_path / "out").read_text() == "not a folder"


def test_merge_writes_shards_and_an_index_that_transformers_loads(tmp_path):
    dirs, data = make_federation(tmp_path, "bert")
    for model_dir, data_file in zip(dirs, data):
        assert gramfuse("stats", model_dir, data_file) == 0
    assert gramfuse("merge", *dirs, "-o", tmp_path / "whole") == 0
    assert gramfuse("merge", *dirs, "-o", tmp_path / "sharded", "--max-shard-size", "20KB") == 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    for name in shards:  # as save_pretrained: at most the size, unless one tensor alone is larger (the embeddings)
        tensors = [tensor for tensor, shard in index["weight_map"].items() if shard == name]
        assert (tmp_path / "sharded" / name).stat().st_size <= 20_000 + 4_096 or len(tensors) == 1, name
    whole = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "whole")).state_dict()
    sharded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "sharded")).state_dict()
    assert whole.keys() == sharded.keys() and all(torch.equal(whole[k], sharded[k]) for k in whole)


def test_bfloat16_owners_give_a_bfloat16_merge(tmp_path):
    base = tiny_model("bert").to(torch.bfloat16)
    dirs = [save_owner(perturbed(base.float(), seed=20 + i).to(torch.bfloat16), tmp_path / f"owner{i}")
            for i in range(2)]
    for i, model_dir in enumerate(dirs):
        assert gramfuse("stats", model_dir, write_data(tmp_path / f"data{i}.jsonl", 24, seed=i)) == 0
    assert gramfuse("merge", *dirs, "-o", tmp_path / "merged") == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert {value.dtype for value in merged.values() if value.is_floating_point()} == {torch.bfloat16}
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"), dtype="auto")
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("device, message", [("cuda:99", "CUDA GPU"), ("tpu", "device 'tpu'")])
def test_a_device_that_is_not_there_is_a_clear_error(tmp_path, capsys, device, message):
    dirs, data = make_federation(tmp_path, "bert")
    expect_error(capsys, ["stats", dirs[0], data[0], "--device", device], message)
    assert not (dirs[0] / "gramfuse-stats.safetensors").exists()
    expect_error(capsys, ["merge", *dirs, "-o", tmp_path / "out", "--device", device], message)


def test_task_vectors_without_a_base_ask_for_one_before_reading_weights(tmp_path, capsys):
    dirs, _ = make_federation(tmp_path, "bert")
    assert gramfuse("merge", *dirs, "-o", tmp_path / "out", "--method", "task-arithmetic") == 1
    assert "give --base BASE_DIR" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_only_a_real_copy_is_warned_about_as_a_copy(tmp_path, caplog):
    """Owners of their own merge without a copy warning (an owner is never its own copy); the same weights again
    without statistics, which nothing can tell from a copy, merge with one."""
    import shutil

    dirs, data = make_federation(tmp_path, "bert")
    for model_dir, data_file in zip(dirs, data):
        assert gramfuse("stats", model_dir, data_file) == 0
    with caplog.at_level("WARNING", logger="gramfuse"):
        assert gramfuse("merge", *dirs, "-o", tmp_path / "m") == 0
    assert "same weights" not in caplog.text
    twin = tmp_path / "twin"
    shutil.copytree(dirs[0], twin)
    (twin / "gramfuse-stats.safetensors").unlink()
    with caplog.at_level("WARNING", logger="gramfuse"):
        assert gramfuse("merge", dirs[0], twin, "-o", tmp_path / "avg", "--method", "average") == 0
    assert "owners 'owner0' and 'twin' hold the very same weights" in caplog.text
