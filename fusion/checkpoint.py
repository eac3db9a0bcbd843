"""Hugging Face model folders: loading an owner's classifier, its head, its label set, and saving a merged model."""

from __future__ import annotations

import json

import shutil
import uuid
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import CompatibilityError, GramfuseError, MergeError

_quiet = False


def quiet_transformers() -> None:
    # Loading a merged or fine-tuned model is routine here; transformers' notes about it would drown our own output.
    global _quiet
    if not _quiet:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        _quiet = True


def load_classifier(path: str | Path, *, allow_missing: bool = False) -> tuple[Any, list[str]]:
    """A sequence classifier from a folder, in float32 and eval mode, with the names of weights it lacked.

    A folder whose checkpoint lacks weights (an untrained classification head that transformers would initialise at
    random) is an error unless ``allow_missing``: statistics or a merge of random weights would be meaningless.
    """
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise GramfuseError(f"{path}: not a model folder (no config.json)")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise GramfuseError(f"{path}: cannot load the model: {error}") from error
    missing = sorted(info.get("missing_keys", []))
    if missing and not allow_missing:
        raise GramfuseError(
            f"{path}: the checkpoint lacks {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''} "
            "(an untrained classification head?); fine-tune the model first"
        )
    model.eval()
    return model, missing


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers: pad with end-of-text, the mask hides it anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def head_names(model: Any) -> set[str]:
    """Parameters outside the pretrained body: the task head (BERT's classifier, GPT-2's score, ...)."""
    prefix = getattr(model, "base_model_prefix", "")
    names = set(model.state_dict())
    if not prefix or not any(name.startswith(prefix + ".") for name in names):
        return set()
    return {name for name in names if not name.startswith(prefix + ".")}


def public_config_json(config: Any) -> str:
    """A model config to send to the server, without the site's local path (``_name_or_path``)."""
    values = json.loads(config.to_json_string(use_diff=False))
    values.pop("_name_or_path", None)
    return json.dumps(values)


def label_set(config: Any) -> tuple[tuple[int, str], ...]:
    return tuple(sorted((int(index), str(label)) for index, label in config.id2label.items()))


def float_state(model: Any) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a model's state dict (integer buffers such as position ids are not merged)."""
    return {name: value for name, value in model.state_dict().items() if value.is_floating_point()}


def check_finite(owner: str, params: Mapping[str, torch.Tensor]) -> None:
    for name, value in params.items():
        if not torch.isfinite(value).all():
            raise MergeError(f"owner {owner!r}: layer {name!r}: weights hold NaN or Inf")


def check_same_shapes(owner: str, params: Mapping[str, torch.Tensor], reference_owner: str, reference: Mapping) -> None:
    """Every parameter present in both, with equal shapes; the error names the owner and the first bad layer."""
    missing = sorted(set(reference) - set(params))
    extra = sorted(set(params) - set(reference))
    if missing or extra:
        detail = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which {reference_owner!r} lacks"
        raise CompatibilityError(f"owner {owner!r}: a different architecture from owner {reference_owner!r}: {detail}")
    for name, value in params.items():
        if tuple(value.shape) != tuple(reference[name]):
            raise CompatibilityError(
                f"owner {owner!r}: layer {name!r} has shape {tuple(value.shape)} but owner {reference_owner!r} "
                f"has {tuple(reference[name])}"
            )


@contextmanager
def atomic_folder(out_dir: str | Path, overwrite: bool = False):
    """A temporary sibling folder renamed to ``out_dir`` only on success, so no half-written output is ever left."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise GramfuseError(f"{out_dir}: exists and is not empty (give --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def tokenizer_or_none(path: str | Path) -> Any:
    try:
        return load_tokenizer(path)
    except (OSError, ValueError):
        return None  # a model folder without a tokenizer gives a merged folder without one


def tokenizer_files(model_dir: str | Path) -> dict[str, bytes]:
    """The files a tokenizer saves, as bytes: how a tokenizer travels to a server that has no model folder."""
    import tempfile

    tokenizer = tokenizer_or_none(model_dir)
    if tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def tokenizer_from_files(files: Mapping[str, bytes]) -> Any:
    import tempfile

    if not files:
        return None
    with tempfile.TemporaryDirectory() as folder:
        for name, data in files.items():
            (Path(folder) / Path(name).name).write_bytes(data)
        return load_tokenizer(folder)


def save_classifier(config: Any, params: Mapping[str, torch.Tensor], tokenizer: Any, out_dir: Path) -> None:
    """Write ``params`` into the architecture ``config`` describes, with the tokenizer, for ``from_pretrained``."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    model = AutoModelForSequenceClassification.from_config(config)
    state = model.state_dict()
    missing = sorted(n for n, v in state.items() if v.is_floating_point() and n not in params)
    if missing:
        raise MergeError(f"merged parameters lack {', '.join(missing[:4])}")
    for name, value in params.items():
        state[name] = value.to(state[name].dtype)
    model.load_state_dict(state)
    model.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
