"""Hugging Face model folders: loading an owner's model for its task, its head, its label set, its tied weights, and
writing a merged model as safetensors shards."""

from __future__ import annotations

import json

import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import CompatibilityError, GramfuseError, MergeError
from .finite import all_finite
from .lazy import DTYPES

_quiet = False


def quiet_transformers() -> None:
    # Loading a merged or fine-tuned model is routine here; transformers' notes about it would drown our own output.
    global _quiet
    if not _quiet:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        _quiet = True


def load_model(path: str | Path, task: str | None = None, *, allow_missing: bool = False,
               base: str | Path | None = None) -> tuple[Any, list[str]]:
    """The model of a folder for its task (its config's architecture, or ``task``), in its checkpoint's dtype and eval
    mode, with the names of the weights its checkpoint lacked. A LoRA adapter folder gives its base model (``base``
    overrides the one its config names) with the adapter's effective weights.

    A checkpoint that lacks weights the task's model needs (an untrained head that transformers would initialise at
    random, or a model of another task) is an error unless ``allow_missing``: statistics or a merge of random weights
    would be meaningless.
    """
    from .adapters import apply_adapter, is_adapter, open_adapter
    from .tasks import task_of

    quiet_transformers()
    path = Path(path)
    if is_adapter(path):
        adapter = open_adapter(path, base)
        model, missing = load_model(adapter.base, task or adapter.task, allow_missing=True)
        missing = [name for name in missing if name not in adapter.replaced]  # a head the adapter trained
        if missing and not allow_missing:
            raise GramfuseError(f"{path}: {missing_weights_message(missing, task_of(model.config, task).name)}")
        return apply_adapter(model, adapter), missing
    if not (path / "config.json").is_file():
        raise GramfuseError(f"{path}: not a model folder (no config.json)")
    config = read_config(path)
    try:
        kind = task_of(config, task)
    except GramfuseError as error:
        raise type(error)(f"{path}: {error}") from None
    try:
        model, info = kind.auto().from_pretrained(str(path), dtype="auto", output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise GramfuseError(f"{path}: cannot load the model as {kind.name}: {error}") from error
    missing = sorted(info.get("missing_keys", []))
    if missing and not allow_missing:
        raise GramfuseError(f"{path}: {missing_weights_message(missing, kind.name)}")
    model.eval()
    return model, missing


def missing_weights_message(missing: Sequence[str], task: str) -> str:
    return (f"the checkpoint lacks {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}, which a {task} model "
            "needs: a head that was never trained (fine-tune the model first), or a checkpoint of another task "
            "(give --task)")


def read_config(path: str | Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as error:
        raise GramfuseError(f"{path}: cannot read config.json: {error}") from error


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise GramfuseError(f"device {device!r}: {error} (use auto, cpu, cuda or cuda:N)") from error
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index or 0) >= count:
            raise GramfuseError(f"device {device!r}: this machine has {count} CUDA GPU(s) (use --device cpu or auto)")
    elif resolved.type != "cpu":
        raise GramfuseError(f"device {device!r}: only cpu and cuda are supported")
    return resolved


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


def tied_aliases(model: Any) -> dict[str, str]:
    """Parameters that are another parameter under a second name (an LM head tied to the input embeddings), each
    mapped to the name the tensor is stored under: the first name PyTorch gives it, the one ``save_pretrained``
    keeps. A tied tensor is one tensor everywhere in a merge, known by that name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def float_state(model: Any) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a model's state dict, each tied tensor once (integer buffers such as position
    ids are not merged)."""
    aliases = tied_aliases(model)
    return {name: value for name, value in model.state_dict().items()
            if value.is_floating_point() and name not in aliases}


def check_finite(owner: str, params: Mapping[str, torch.Tensor]) -> None:
    for name, value in params.items():
        if not all_finite(value):
            raise MergeError(f"owner {owner!r}: layer {name!r}: weights hold NaN or Inf")


def check_same_shapes(owner: str, params: Mapping[str, Any], reference_owner: str, reference: Mapping) -> None:
    """Every parameter present in both, with equal shapes (``params``: tensors, or their shapes); the error names the
    owner and the first bad layer."""
    missing = sorted(set(reference) - set(params))
    extra = sorted(set(params) - set(reference))
    if missing or extra:
        detail = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which {reference_owner!r} lacks"
        raise CompatibilityError(f"owner {owner!r}: a different architecture from owner {reference_owner!r}: {detail}")
    for name, value in params.items():
        shape = tuple(getattr(value, "shape", value))
        if shape != tuple(reference[name]):
            raise CompatibilityError(
                f"owner {owner!r}: layer {name!r} has shape {shape} but owner {reference_owner!r} "
                f"has {tuple(reference[name])}"
            )


@contextmanager
def atomic_folder(out_dir: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()):
    """A temporary sibling folder renamed to ``out_dir`` only on success, so no half-written output is ever left.
    ``inputs``: the folders the run reads, which the output may not be, contain or lie inside (:func:`check_apart`)."""
    out_dir = Path(out_dir)
    check_apart(out_dir, inputs)
    if out_dir.exists() and not out_dir.is_dir():
        raise GramfuseError(f"{out_dir}: is a file, not a folder (the output is a model folder)")
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


def check_apart(out_dir: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output folder that is, contains or lies inside one of the ``inputs`` (symbolic links resolved):
    writing it, or replacing it with ``--overwrite``, would destroy or pollute what the run reads."""
    out = Path(out_dir).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if out == source:
            relation = "is"
        elif out in source.parents:
            relation = "contains"
        elif source in out.parents:
            relation = "lies inside"
        else:
            continue
        raise GramfuseError(f"{out_dir}: the output folder {relation} the input {given}; choose a folder apart from "
                            "the inputs (--overwrite would delete them)")


def tokenizer_or_none(path: str | Path, base: str | Path | None = None) -> Any:
    """A folder's tokenizer; an adapter folder without one has its base's."""
    from .adapters import is_adapter, open_adapter

    try:
        return load_tokenizer(path)
    except (OSError, ValueError):
        if is_adapter(path):
            return tokenizer_or_none(open_adapter(path, base).base)
        return None  # a model folder without a tokenizer gives a merged folder without one


def folder_tokenizer(path: str | Path, base: str | Path | None = None) -> Any:
    tokenizer = tokenizer_or_none(path, base)
    if tokenizer is None:
        raise GramfuseError(f"{path}: no tokenizer (save it with the model: tokenizer.save_pretrained)")
    return tokenizer


def tokenizer_files(model_dir: str | Path, base: str | Path | None = None) -> dict[str, bytes]:
    """The files a tokenizer saves, as bytes: how a tokenizer travels to a server that has no model folder."""
    import tempfile

    tokenizer = tokenizer_or_none(model_dir, base)
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


DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' own default: a shard is written as it fills, never held in memory
SAFETENSORS_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class TensorFile:
    """One safetensors file written tensor by tensor: the bytes go to a side file as they come, and the header
    (which the format puts first, and which needs every tensor's offsets) is written when it is closed.

    ``safetensors.torch.save_file`` takes the whole dict at once: a merged shard would have to sit in memory.
    """

    def __init__(self, data_path: Path) -> None:
        self.data_path = data_path
        self.data = data_path.open("wb")
        self.header: dict[str, Any] = {}
        self.size = 0

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().contiguous().cpu()
        raw = value.reshape(-1).view(torch.uint8).numpy() if value.numel() else b""
        self.header[name] = {"dtype": SAFETENSORS_NAMES[value.dtype], "shape": list(value.shape),
                             "data_offsets": [self.size, self.size + len(raw)]}
        self.data.write(raw)
        self.size += len(raw)

    def close(self, path: Path, metadata: Mapping[str, str] | None = None) -> None:
        self.data.close()
        metadata = {"format": "pt", **(metadata or {})}
        header = json.dumps({"__metadata__": metadata, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the format pads the header with spaces so that the data is aligned
        with path.open("wb") as out, self.data_path.open("rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 16 * 1024 * 1024)
        self.data_path.unlink()

    def discard(self) -> None:
        """Remove what was written (a failed write leaves nothing behind)."""
        self.data.close()
        self.data_path.unlink(missing_ok=True)


class ShardWriter:
    """Tensors written as safetensors shards of at most ``max_shard_bytes`` as they come, with an index when there is
    more than one, as ``save_pretrained(max_shard_size=...)`` writes them: what ``from_pretrained`` loads.

    Nothing is held in memory but the tensor being written.
    """

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[TensorFile] = []
        self.total_bytes = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            size = value.numel() * value.element_size()
            if not self.shards or (self.shards[-1].size and self.shards[-1].size + size > self.max_shard_bytes):
                self.folder.mkdir(parents=True, exist_ok=True)
                self.shards.append(TensorFile(self.folder / f".shard-{len(self.shards)}.partial"))
            self.shards[-1].add(name, value)
            self.total_bytes += size

    def close(self) -> list[Path]:
        """Name the shards (``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` and the index)."""
        from .lazy import INDEX_FILE, SINGLE_FILE

        if not self.shards:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.shards.append(TensorFile(self.folder / ".shard-0.partial"))
        count = len(self.shards)
        names = [SINGLE_FILE] if count == 1 else [f"model-{n:05d}-of-{count:05d}.safetensors" for n in range(1, count + 1)]
        for shard, name in zip(self.shards, names):
            shard.close(self.folder / name)
        if count > 1:
            weight_map = {tensor: name for shard, name in zip(self.shards, names) for tensor in shard.header}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return [self.folder / name for name in names]


def model_skeleton(config: Any, task: str | None = None) -> Any:
    """The model ``config`` describes for its task, on the meta device: parameter names and layers, no weights."""
    from .tasks import task_of

    quiet_transformers()
    with torch.device("meta"):
        return task_of(config, task).auto().from_config(config)


def missing_from(skeleton: Any, present: set[str]) -> list[str]:
    """The state-dict entries of ``skeleton`` that a checkpoint holding ``present`` lacks (a tied parameter counts as
    present when the tensor it is tied to is)."""
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    names_of: dict[int, list[str]] = {}
    for name, param in params.items():
        names_of.setdefault(id(param), []).append(name)
    missing = []
    for name in skeleton.state_dict():
        tied = names_of.get(id(params[name]), [name]) if name in params else [name]
        if not any(other in present for other in tied):
            missing.append(name)
    return sorted(missing)
