"""The statistics file: round trip, and a clear error for every way it can be broken."""

import json
import struct

import pytest
import torch
from helpers import tiny_model, tokenizer
from safetensors.torch import save_file

from fusion.errors import StatisticsError
from fusion.gram import collect_statistics
from fusion.statistics import load_statistics, read_metadata, save_statistics


@pytest.fixture()
def saved(tmp_path):
    model = tiny_model("bert")
    batch = dict(tokenizer()(["good movie", "bad plot"], padding=True, return_tensors="pt"))
    stats = collect_statistics(model, [batch], settings={"max_length": 128})
    path = save_statistics(stats, tmp_path / "stats.safetensors")
    return stats, path


def rewrite(path, tensors_edit=None, meta_edit=None):
    stats = load_statistics(path)
    tensors = {"gram." + k: v for k, v in stats.grams.items()}
    meta = stats.metadata()
    if tensors_edit:
        tensors_edit(tensors)
    if meta_edit:
        meta_edit(meta)
    save_file(tensors, str(path), metadata={"gramfuse": json.dumps(meta)})


def test_round_trip(saved):
    stats, path = saved
    loaded = load_statistics(path)
    assert loaded.fingerprint == stats.fingerprint
    assert loaded.modules == stats.modules
    assert loaded.token_counts == stats.token_counts and loaded.example_count == 2
    assert loaded.settings == {"max_length": 128}
    for key in stats.grams:
        assert torch.equal(loaded.grams[key], stats.grams[key])
        assert loaded.grams[key].dtype == torch.float64


def test_only_one_triangle_per_shared_input_is_stored(saved):
    stats, _ = saved
    for key, packed in stats.grams.items():
        assert packed.numel() == stats.dims[key] * (stats.dims[key] + 1) // 2
    assert len(stats.grams) < len(stats.modules)


def test_truncated_file(saved):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StatisticsError, match="corrupt or truncated"):
        load_statistics(path)


def test_garbage_header(saved):
    _, path = saved
    path.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!}" + b"\0" * 10)
    with pytest.raises(StatisticsError, match=str(path.name)):
        load_statistics(path)


def test_missing_file(tmp_path):
    with pytest.raises(StatisticsError, match="no statistics file"):
        load_statistics(tmp_path / "nope.safetensors")


def test_nan_in_a_gram_names_the_layer(saved):
    _, path = saved
    key = "bert.encoder.layer.1.output.dense"

    def poison(tensors):
        tensors["gram." + key][3] = float("nan")

    rewrite(path, tensors_edit=poison)
    with pytest.raises(StatisticsError, match=f"layer '{key}': Gram holds NaN or Inf"):
        load_statistics(path)


def test_wrong_gram_shape_names_the_layer(saved):
    _, path = saved
    key = "classifier"

    def shorten(tensors):
        tensors["gram." + key] = tensors["gram." + key][:-1].clone()

    rewrite(path, tensors_edit=shorten)
    with pytest.raises(StatisticsError, match=f"layer '{key}': Gram has shape"):
        load_statistics(path)


def test_gram_listed_but_missing(saved):
    _, path = saved

    def drop(tensors):
        del tensors["gram.classifier"]

    rewrite(path, tensors_edit=drop)
    with pytest.raises(StatisticsError, match="layer 'classifier': Gram listed in the metadata but missing"):
        load_statistics(path)


def test_other_format_version(saved):
    _, path = saved
    rewrite(path, meta_edit=lambda meta: meta.update(format_version=99))
    with pytest.raises(StatisticsError, match="format version 99"):
        read_metadata(path)


def test_metadata_missing_a_key(saved):
    _, path = saved
    rewrite(path, meta_edit=lambda meta: meta.pop("fingerprint"))
    with pytest.raises(StatisticsError, match="lacks 'fingerprint'"):
        load_statistics(path)


def test_plain_safetensors_without_our_metadata(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(StatisticsError, match="without gramfuse metadata"):
        load_statistics(path)


def test_saving_is_atomic(saved, tmp_path):
    stats, _ = saved
    path = save_statistics(stats, tmp_path / "again.safetensors")
    assert not list(tmp_path.glob("*.partial"))
    assert load_statistics(path).fingerprint == stats.fingerprint


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_partial(saved, tmp_path):
    """Written tensor by tensor: a failure after some tensors are on disk removes them, and the file already under
    the real name stays as it was."""
    import dataclasses

    stats, _ = saved
    path = save_statistics(stats, tmp_path / "kept.safetensors")
    before = path.read_bytes()
    broken = dataclasses.replace(stats, grams={**stats.grams, "zz-unwritable": torch.zeros(3, dtype=torch.complex64)})
    with pytest.raises(KeyError):  # no safetensors name for a complex dtype, after the real Grams were written
        save_statistics(broken, path)
    assert path.read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if "partial" in p.name]
