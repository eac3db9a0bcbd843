"""What an owner sends to the aggregation server, as plain tensors and JSON: no Flower here.

The client wraps :func:`owner_payload` into Flower records; the server unwraps them and calls
:func:`owner_from_payload`. Tensors: the floating-point weights (``weight.<name>``), one packed triangle per shared
Gram (``gram.<key>``) and, for Fisher, the diagonal (``fisher.<name>``). Metadata: the statistics metadata (counts,
which module shares which Gram), the label set, the model config, and the head's parameter names.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fusion.adapters import AdapterFiles
from fusion.aggregate import OwnerUpdate
from fusion.checkpoint import float_state, head_names, label_set, public_config_json, tied_aliases
from fusion.errors import GramfuseError, StatisticsError
from fusion.tasks import model_task
from fusion.statistics import FISHER_PREFIX, GRAM_PREFIX, GramStatistics, packed_diagonal, statistics_from

WEIGHT_PREFIX = "weight."
PAYLOAD_VERSION = 1


def owner_payload(model: Any, stats: GramStatistics | None, fisher: bool = False, *,
                  part: Part | None = None) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of one owner; ``fisher`` adds the Fisher diagonal (which the statistics must hold).

    ``part`` restricts the tensors to some weights and Grams (the server asks for a model a few layers at a time):
    ``Part.LAYOUT`` sends the layout alone (every weight's shape and dtype, the statistics' metadata), no tensors.
    """
    weights = float_state(model)
    meta: dict[str, Any] = {
        "payload_version": PAYLOAD_VERSION,
        "dtypes": {name: str(value.dtype).removeprefix("torch.") for name, value in weights.items()},
        "shapes": {name: list(value.shape) for name, value in weights.items()},
        "label_set": [list(item) for item in label_set(model.config)],
        "model_type": model.config.model_type,
        "config": public_config_json(model.config),
        "head": sorted(head_names(model)),
    }
    if part is not None and part.layout:  # what lets the server weigh this site against the others, before any part
        meta["scales"] = {name: float(value.abs().max()) if value.numel() else 0.0 for name, value in weights.items()}
        if stats is not None:
            meta["traces"] = {key: float(packed_diagonal(stats.grams[key], stats.dims[key]).sum())
                              for key in stats.grams}
    names = list(weights) if part is None else [name for name in part.weights if name in weights]
    tensors = {WEIGHT_PREFIX + name: wire_tensor(weights[name]) for name in names}
    meta["partial"] = part is not None
    if stats is not None:
        meta["statistics"] = stats.metadata()  # whole: which layer reads which Gram, counts (a few kB)
        grams = stats.grams if part is None else [key for key in part.grams if key in stats.grams]
        tensors.update({GRAM_PREFIX + key: stats.grams[key] for key in grams})
        if fisher:
            if not stats.fisher:
                raise StatisticsError("the method needs the Fisher, and these statistics hold none")
            tensors.update({FISHER_PREFIX + name: stats.fisher[name] for name in names if name in stats.fisher})
    return tensors, meta


@dataclass(frozen=True)
class Part:
    """The weights and Grams the server asks a site for in one message; ``Part.LAYOUT`` asks for the layout alone."""

    weights: tuple[str, ...]
    grams: tuple[str, ...]
    layout: bool = False  # the run's first request: no tensors, and the tokenizer (a later part may be empty too)

    def to_config(self) -> dict[str, str]:
        return {"part-weights": json.dumps(list(self.weights)), "part-grams": json.dumps(list(self.grams)),
                "part-layout": self.layout}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Part | None:
        if "part-weights" not in config:
            return None
        return cls(tuple(json.loads(str(config["part-weights"]))), tuple(json.loads(str(config["part-grams"]))),
                   bool(config.get("part-layout", False)))


Part.LAYOUT = Part((), (), layout=True)


def restricted_metadata(meta: Mapping[str, Any], grams: Iterable[str]) -> dict[str, Any]:
    """Statistics metadata for some Grams only, with the layers that read them."""
    keep = set(grams) & set(meta["grams"])
    return {**meta, "grams": {key: info for key, info in meta["grams"].items() if key in keep},
            "modules": {name: info for name, info in meta["modules"].items() if info["gram"] in keep}}


def config_from(meta: Mapping[str, Any]) -> Any:
    """The transformers config a site sent (``public_config_json``)."""
    from transformers import AutoConfig

    values = json.loads(meta["config"])
    return AutoConfig.for_model(values.pop("model_type"), **values)


def labels_from(label_set: Iterable) -> tuple:
    """A label set as sent (``[[index, label], ...]``), as :func:`fusion.checkpoint.label_set` gives it."""
    return tuple((int(index), str(label)) for index, label in label_set)


def dtype_from(name: str) -> torch.dtype:
    """A weight dtype as sent (``"bfloat16"``)."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise GramfuseError(f"unknown weight dtype {name!r}")
    return dtype


def wire_tensor(value: torch.Tensor) -> torch.Tensor:
    """A tensor as Flower's ``Array`` can carry it: bfloat16, which numpy lacks, as float32 (exactly)."""
    value = value.detach().contiguous()
    return value.float() if value.dtype == torch.bfloat16 else value


def untouched_by_adapter(model: Any, files: Any) -> dict[str, Any] | None:
    """For a site whose model is a LoRA adapter (``files``: :func:`fusion.adapters.checkpoint_files`): its base's
    fingerprint and the weights it leaves as its base's. A server that holds the same base fills those in itself and
    asks the site for the adapted layers alone. None for a full model."""
    if not isinstance(files, AdapterFiles):
        return None
    changed = files.changed
    changed |= {stored for alias, stored in tied_aliases(model).items() if alias in changed}  # a tied head's tensor
    untouched = [name for name in float_state(model) if name not in changed and name in files.base]
    return {"base_fingerprint": files.base.fingerprint(), "untouched": untouched}


def describe_model(model: Any) -> dict[str, Any]:
    """What must agree between owners before anything heavy is sent: task, model type, body shapes, label set."""
    import hashlib

    head = head_names(model)
    shapes = sorted((name, tuple(v.shape)) for name, v in float_state(model).items() if name not in head)
    return {
        "task": model_task(model).name,
        "model_type": model.config.model_type,
        "body": hashlib.sha256(repr(shapes).encode()).hexdigest()[:16],
        "label_set": [list(item) for item in label_set(model.config)],
    }


def owner_from_payload(name: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> OwnerUpdate:
    """The :class:`OwnerUpdate` a payload describes; malformed payloads are errors naming the owner."""
    try:
        if meta.get("payload_version") != PAYLOAD_VERSION:
            raise GramfuseError(f"payload version {meta.get('payload_version')!r}, expected {PAYLOAD_VERSION}")
        dtypes = meta.get("dtypes", {})
        params = {k[len(WEIGHT_PREFIX):]: v for k, v in tensors.items() if k.startswith(WEIGHT_PREFIX)}
        # Back to the site's own dtype (exact: bf16 travels as float32), which the merged model is saved in.
        params = {name: value.to(dtype_from(dtypes.get(name, "float32"))) for name, value in params.items()}
        config = config_from(meta)
        stats_meta = meta.get("statistics")
        if stats_meta is not None and meta.get("partial"):  # a few layers: the Grams that came, and their layers
            stats_meta = restricted_metadata(stats_meta, [k[len(GRAM_PREFIX):] for k in tensors
                                                          if k.startswith(GRAM_PREFIX)])
        stats = statistics_from("payload", stats_meta, tensors) if stats_meta is not None else None
        return OwnerUpdate(
            name=name,
            params=params,
            head=set(meta["head"]),
            label_set=labels_from(meta["label_set"]),
            model_type=str(meta["model_type"]),
            statistics=stats,
            config=config,
        )
    except GramfuseError as error:
        raise type(error)(f"owner {name!r}: {error}") from error
    except (KeyError, TypeError, ValueError) as error:
        raise GramfuseError(f"owner {name!r}: malformed payload ({type(error).__name__}: {error})") from error

