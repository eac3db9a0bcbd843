"""What a data site does with a model folder and a data file: statistics and evaluation.

The CLI and the Flower client both call these; they load, stream and report, and leave the maths to the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .adapters import AdapterFiles, checkpoint_files
from .budget import PrivacyBudget
from .checkpoint import check_finite, float_state, folder_tokenizer, load_model, resolve_device
from .data import batches, count_examples, read_examples
from .encode import Encoder, task_fields
from .errors import DataError
from .evaluate import scores
from .fisher import collect_fisher
from .forgetting import owner_report, pooled_hidden_states
from .gram import collect_statistics
from .privacy import PrivacyError, PrivacySpec
from .statistics import STATS_FILENAME, GramStatistics, save_statistics
from .tasks import example_log_likelihood, task_of

log = logging.getLogger("gramfuse")


@dataclass(frozen=True)
class DataSettings:
    max_length: int = 128
    batch_size: int = 32
    max_examples: int | None = None
    text_field: str | None = None  # None: the task's own (text; tokens for token classification)
    label_field: str | None = None  # None: the task's own (label; tags for token classification)
    task: str | None = None  # None: from the checkpoint's config.architectures
    pair_field: str = "text_pair"

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise DataError(f"{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.max_examples is not None and self.max_examples < 1:
            raise DataError(f"max-examples must be at least 1, not {self.max_examples}")


def task_batches(model: Any, tokenizer: Any, data_file: Path, settings: DataSettings, labelled: bool):
    """Batches of the data file for the model's task; labels are always checked against the model where present."""
    return config_batches(model.config, tokenizer, data_file, settings, labelled)


def config_batches(config: Any, tokenizer: Any, data_file: Path, settings: DataSettings, labelled: bool):
    """:func:`task_batches` for a model config (an owner's, whose labels its data holds, run on another's model)."""
    task = task_of(config, settings.task)
    fields = task_fields(task, settings.text_field, settings.label_field, settings.pair_field)
    examples = read_examples(data_file, fields, require_labels=labelled and fields.label is not None)
    encoder = Encoder(task, tokenizer, config, max_length=settings.max_length, path=data_file, labelled=labelled)
    return batches(examples, encoder, batch_size=settings.batch_size, max_examples=settings.max_examples)


def _bar(data_file: Path, settings: DataSettings, description: str, enabled: bool):
    total = count_examples(data_file)
    if settings.max_examples is not None:
        total = min(total, settings.max_examples)
    return tqdm(total=total, desc=description, unit="ex", disable=not enabled, leave=False)


def expected_settings(settings: DataSettings, privacy: PrivacySpec | None, draw_noise: bool = True) -> dict:
    """The settings a statistics file computed with these reading settings and this DP request holds (clipped
    only, without ``draw_noise``)."""
    if privacy is None:
        return asdict(settings)
    return {**asdict(settings), "privacy": privacy.request() if draw_noise else privacy.clipping()}


def compute_statistics(
    model_dir: str | Path,
    data_file: str | Path,
    *,
    settings: DataSettings = DataSettings(),
    fisher: bool = False,
    gram_dtype: str = "float64",
    out: str | Path | None = None,
    progress: bool = True,
    model: Any = None,
    device: str = "cpu",
    base: str | Path | None = None,
    privacy: PrivacySpec | None = None,
    draw_noise: bool = True,
    budget: PrivacyBudget | None = None,
) -> tuple[GramStatistics, Path]:
    """Gram statistics (and optionally the Fisher) of a model folder over a data file, saved next to the model.

    ``model`` is the folder's model when the caller has already loaded it. ``device``: ``cpu``, ``cuda`` (or
    ``cuda:N``), or ``auto`` (a GPU when there is one) runs the forward pass and the Gram products; sums come back
    to the CPU. A LoRA adapter folder (``base`` overrides the base model its config names) has statistics of the
    layers it adapts only: every other layer is the base's, the same for every owner. ``privacy`` makes the
    statistics differentially private (:mod:`fusion.privacy`); ``draw_noise=False`` clips them only. ``budget``
    (:mod:`fusion.budget`) is charged for the noise draw before the file is written: a draw past the budget is
    refused and never saved.
    """
    model_dir, data_file = Path(model_dir), Path(data_file)
    if privacy is not None and fisher:
        raise PrivacyError("the Fisher is not clipped or noised: differentially private statistics hold Grams only")
    if model is None:
        model, _ = load_model(model_dir, settings.task, base=base)
    check_finite(str(model_dir), float_state(model))
    model = model.to(resolve_device(device))
    # The folder's checkpoint, not the loaded model, is what a merge reads and checks the statistics against.
    files = checkpoint_files(model_dir, base)
    fingerprint = files.fingerprint()
    tokenizer = folder_tokenizer(model_dir, base)
    make_batches = partial(task_batches, model, tokenizer, data_file, settings)
    with _bar(data_file, settings, "gram statistics", progress) as bar:
        stats = collect_statistics(
            model, make_batches(labelled=False), compute_dtype=getattr(torch, gram_dtype), settings=asdict(settings),
            progress=bar, fingerprint=fingerprint,
            only=files.adapter.modules if isinstance(files, AdapterFiles) else None, privacy=privacy,
            draw_noise=draw_noise,
        )
    if fisher:
        with _bar(data_file, settings, "fisher", progress) as bar:
            stats.fisher, stats.fisher_example_count = collect_fisher(
                model, make_batches(labelled=True), bar,
                partial(example_log_likelihood, task_of(model.config, settings.task), model.config))
    path = Path(out) if out is not None else model_dir / STATS_FILENAME
    if budget is None or not stats.privacy or stats.noise_std == 0.0:
        save_statistics(stats, path)
        return stats, path
    # Written aside, charged, then named: a draw the budget refuses is never under the real name, and a draw that
    # could not be written is never charged.
    drawn = save_statistics(stats, path.with_name(path.name + ".drawn"))
    try:
        budget.spend(stats.privacy)
    except BaseException:
        drawn.unlink(missing_ok=True)
        raise
    drawn.replace(path)
    return stats, path


def evaluate_folder(
    model_dir: str | Path, data_file: str | Path, *, settings: DataSettings = DataSettings(), progress: bool = True,
    base: str | Path | None = None,
) -> dict[str, float]:
    """The task's scores of a model folder on a data file (:func:`fusion.evaluate.scores`)."""
    model, _ = load_model(model_dir, settings.task, base=base)
    tokenizer = folder_tokenizer(model_dir, base)
    task = task_of(model.config, settings.task)
    with _bar(Path(data_file), settings, "evaluate", progress) as bar:
        return scores(task, model, task_batches(model, tokenizer, Path(data_file), settings, True), bar, tokenizer)


def forgetting_report(
    merged_dir: str | Path, owners: Sequence[tuple[str | Path, str | Path]], *, settings: DataSettings = DataSettings(),
    progress: bool = True, base: str | Path | None = None,
) -> dict[str, Any]:
    """Per owner (its model folder and held-out data file): the merged model's score against the owner's own on
    that data (retention), and linear CKA of their hidden states layer by layer (:mod:`fusion.forgetting`). An owner
    with a head of its own is compared with ``merged_dir/<owner>``, the folder the merge wrote for it."""
    from .merge import owner_names

    merged_dir = Path(merged_dir)
    entries = []
    names = owner_names([Path(model_dir) for model_dir, _ in owners])  # as the merge names owners' own folders
    for name, (model_dir, data_file) in zip(names, owners):
        model_dir, data_file = Path(model_dir), Path(data_file)
        own_folder = merged_dir / name
        serving = own_folder if (own_folder / "config.json").is_file() else merged_dir
        results = {}
        for role, folder in (("merged", serving), ("own", model_dir)):
            model, _ = load_model(folder, settings.task, base=base)
            tokenizer = folder_tokenizer(folder, base)
            task = task_of(model.config, settings.task)
            with _bar(data_file, settings, f"{name}: {role}", progress) as bar:
                results[role] = (scores(task, model, task_batches(model, tokenizer, data_file, settings, True), bar,
                                        tokenizer),
                                 pooled_hidden_states(model, task_batches(model, tokenizer, data_file, settings, True)))
        entry = owner_report(name, results["merged"][0], results["own"][0], results["merged"][1],
                             results["own"][1])
        log.info("%s: %s %.4g merged, %.4g own: retention %.3f; CKA of the last layer %.3f", entry["owner"],
                 entry["score"], entry["merged"], entry["own"], entry["retention"], entry["cka"][-1])
        entries.append(entry)
    retentions = [entry["retention"] for entry in entries]
    return {"merged": str(merged_dir), "owners": entries,
            "mean_retention": sum(retentions) / len(retentions) if retentions else float("nan"),
            "worst_retention": min(retentions, default=float("nan"))}
