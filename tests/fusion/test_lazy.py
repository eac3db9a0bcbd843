"""Lazily read checkpoints: what is known from the headers is answered from them, without reading any tensor."""

import pytest
import torch
from safetensors.torch import save_file

from fusion.errors import GramfuseError
from fusion.lazy import CheckpointFiles, Restricted


def test_names_shapes_and_dtypes_come_from_the_header_alone(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16), "ids": torch.arange(4)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    files = CheckpointFiles(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:-8])  # the data cut short: any read now fails
    assert "a" in files and "b" in files and "missing" not in files
    assert files.shape("a") == (3, 4) and files.dtype("b") == torch.bfloat16 and not files.is_float("ids")
    view = Restricted(files, ["a", "missing"])
    assert list(view) == ["a"] and "a" in view and "missing" not in view
    with pytest.raises(GramfuseError, match="cannot read tensor"):
        view["a"]


def test_a_dtype_gramfuse_does_not_merge_is_named(tmp_path):
    save_file({"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(GramfuseError, match="tensor 'w' has dtype F8_E4M3"):
        CheckpointFiles(tmp_path)
