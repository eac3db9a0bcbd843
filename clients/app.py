"""The data-site Flower ClientApp: statistics at the site, only statistics and weights leave it.

Node config (``flower-supernode --node-config "model-path='…' data-path='…'"``):

- ``model-path``, ``data-path`` (required in a deployment): the site's fine-tuned model folder and its data file;
- ``max-length`` (128), ``batch-size`` (32), ``max-examples`` (all): as for ``gramfuse stats``;
- ``name``: a label for the site in the server's report (the node id is always reported).

In a local simulation the node has no such keys; it takes owner number ``partition-id`` (in name order) of the
run config's ``workspace``, a folder of ``<owner>/model/`` and ``<owner>/data.jsonl``.

The statistics file already in the model folder is reused when it was made from these weights with these settings
(and holds the Fisher where the method needs it); otherwise the statistics are computed and saved there.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fusion.checkpoint import float_state, load_classifier, tokenizer_files
from fusion.errors import GramfuseError, StatisticsError
from fusion.payload import describe_model, owner_payload
from fusion.statistics import STATS_FILENAME, load_statistics, weights_fingerprint
from fusion.workflows import DataSettings, compute_statistics

log = logging.getLogger("gramfuse.client")
app = ClientApp()

PAYLOAD = "owner"  # ArrayRecord: weights, Grams, Fisher
META = "meta"  # ConfigRecord: one JSON string and the tokenizer's files
TOKENIZER = "tokenizer/"


def site_paths(context: Context) -> tuple[Path, Path]:
    node = context.node_config
    if "model-path" in node and "data-path" in node:
        return Path(str(node["model-path"])), Path(str(node["data-path"]))
    workspace = context.run_config.get("workspace")
    if "partition-id" not in node or not workspace:
        raise GramfuseError("node config needs model-path and data-path (or a simulation with run config workspace)")
    owners = sorted(p for p in Path(str(workspace)).iterdir() if (p / "model").is_dir())
    index = int(node["partition-id"])
    if index >= len(owners):
        raise GramfuseError(f"simulated node {index} has no owner folder in {workspace} ({len(owners)} owners)")
    return owners[index] / "model", owners[index] / "data.jsonl"


def data_settings(context: Context) -> DataSettings:
    node = context.node_config
    max_examples = node.get("max-examples")
    return DataSettings(
        max_length=int(node.get("max-length", 128)),
        batch_size=int(node.get("batch-size", 32)),
        max_examples=int(max_examples) if max_examples else None,
    )


def site_statistics(model_dir: Path, data_file: Path, settings: DataSettings, fisher: bool):
    """The model and its statistics: the site's statistics file when it fits, else freshly computed."""
    model, _ = load_classifier(model_dir)
    stats_file = model_dir / STATS_FILENAME
    if stats_file.is_file():
        try:
            stats = load_statistics(stats_file)
        except StatisticsError as error:
            log.warning("%s; computing the statistics again", error)
        else:
            fits = (
                stats.fingerprint == weights_fingerprint(float_state(model))
                and stats.settings == asdict(settings)
                and (stats.fisher is not None or not fisher)
            )
            if fits:
                log.info("reusing %s", stats_file)
                return model, stats
    stats, _ = compute_statistics(model_dir, data_file, settings=settings, fisher=fisher, progress=False, model=model)
    return model, stats


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """A few bytes that let the server find misfits before any site sends its statistics."""
    model_dir, _ = site_paths(context)
    model, _ = load_classifier(model_dir)
    return Message(content=RecordDict({META: ConfigRecord({"json": json.dumps(describe_model(model))})}), reply_to=msg)


@app.train()
def contribute(msg: Message, context: Context) -> Message:
    """Reply to the server's request with this site's weights and statistics (or weights alone for averaging)."""
    started = time.perf_counter()
    request = msg.content["config"]
    needs_statistics = bool(request.get("needs-statistics", True))
    needs_fisher = bool(request.get("needs-fisher", False))
    model_dir, data_file = site_paths(context)
    if needs_statistics:
        model, stats = site_statistics(model_dir, data_file, data_settings(context), needs_fisher)
    else:
        model, stats = load_classifier(model_dir)[0], None
    tensors, meta = owner_payload(model, stats, fisher=needs_fisher)
    # The tokenizer is the public pretrained one; the server needs it to write loadable folders.
    files = {TOKENIZER + name: data for name, data in tokenizer_files(model_dir).items()}
    meta["site"] = str(context.node_config.get("name", model_dir.parent.name if model_dir.name == "model"
                                                 else model_dir.name))
    meta["site_seconds"] = round(time.perf_counter() - started, 3)
    content = RecordDict({PAYLOAD: ArrayRecord(torch_state_dict=tensors), META: ConfigRecord({"json": json.dumps(meta), **files})})
    return Message(content=content, reply_to=msg)

