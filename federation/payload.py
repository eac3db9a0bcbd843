"""What an owner sends to the aggregation server, as plain tensors and JSON: no Flower here.

The client wraps :func:`owner_payload` into Flower records; the server unwraps them and calls
:func:`owner_from_payload`. Tensors: the floating-point weights (``weight.<name>``), one packed triangle per shared
Gram (``gram.<key>``) and, for Fisher, the diagonal (``fisher.<name>``). Metadata: the statistics metadata (counts,
which module shares which Gram), the label set, the model config, and the head's parameter names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from fusion.aggregate import OwnerUpdate
from fusion.checkpoint import float_state, head_names, label_set, public_config_json
from fusion.errors import GramfuseError, StatisticsError
from fusion.statistics import FISHER_PREFIX, GRAM_PREFIX, GramStatistics, statistics_from

WEIGHT_PREFIX = "weight."
PAYLOAD_VERSION = 1


def owner_payload(model: Any, stats: GramStatistics | None, fisher: bool = False) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of one owner; ``fisher`` adds the Fisher diagonal (which the statistics must hold)."""
    weights = float_state(model)
    tensors = {WEIGHT_PREFIX + name: wire_tensor(value) for name, value in weights.items()}
    meta: dict[str, Any] = {
        "payload_version": PAYLOAD_VERSION,
        "dtypes": {name: str(value.dtype).removeprefix("torch.") for name, value in weights.items()},
        "label_set": [list(item) for item in label_set(model.config)],
        "model_type": model.config.model_type,
        "config": public_config_json(model.config),
        "head": sorted(head_names(model)),
    }
    if stats is not None:
        tensors.update({GRAM_PREFIX + key: gram for key, gram in stats.grams.items()})
        meta["statistics"] = stats.metadata()
        if fisher:
            if not stats.fisher:
                raise StatisticsError("the method needs the Fisher, and these statistics hold none")
            tensors.update({FISHER_PREFIX + name: value for name, value in stats.fisher.items()})
    return tensors, meta


def wire_tensor(value: torch.Tensor) -> torch.Tensor:
    """A tensor as Flower's ``Array`` can carry it: bfloat16, which numpy lacks, as float32 (exactly)."""
    value = value.detach().contiguous()
    return value.float() if value.dtype == torch.bfloat16 else value


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise GramfuseError(f"unknown weight dtype {name!r}")
    return dtype


def describe_model(model: Any) -> dict[str, Any]:
    """What must agree between owners before anything heavy is sent: model type, body shapes, label set."""
    import hashlib

    head = head_names(model)
    shapes = sorted((name, tuple(v.shape)) for name, v in float_state(model).items() if name not in head)
    return {
        "model_type": model.config.model_type,
        "body": hashlib.sha256(repr(shapes).encode()).hexdigest()[:16],
        "label_set": [list(item) for item in label_set(model.config)],
    }


def owner_from_payload(name: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> OwnerUpdate:
    """The :class:`OwnerUpdate` a payload describes; malformed payloads are errors naming the owner."""
    from transformers import AutoConfig

    try:
        if meta.get("payload_version") != PAYLOAD_VERSION:
            raise GramfuseError(f"payload version {meta.get('payload_version')!r}, expected {PAYLOAD_VERSION}")
        dtypes = meta.get("dtypes", {})
        params = {k[len(WEIGHT_PREFIX):]: v for k, v in tensors.items() if k.startswith(WEIGHT_PREFIX)}
        # Back to the site's own dtype (exact: bf16 travels as float32), which the merged model is saved in.
        params = {name: value.to(_dtype(dtypes.get(name, "float32"))) for name, value in params.items()}
        config_dict = json.loads(meta["config"])
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        stats = statistics_from("payload", meta["statistics"], tensors) if "statistics" in meta else None
        return OwnerUpdate(
            name=name,
            params=params,
            head=set(meta["head"]),
            label_set=tuple((int(i), str(label)) for i, label in meta["label_set"]),
            model_type=str(meta["model_type"]),
            statistics=stats,
            config=config,
        )
    except GramfuseError as error:
        raise type(error)(f"owner {name!r}: {error}") from error
    except (KeyError, TypeError, ValueError) as error:
        raise GramfuseError(f"owner {name!r}: malformed payload ({type(error).__name__}: {error})") from error

