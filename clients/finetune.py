"""Fine-tune a copy of the shared pretrained model on a site's own data, as a data site would before merging.

    python -m clients.finetune BASE_DIR DATA_FILE -o OUT_DIR --labels negative,positive [--epochs 2]

Word embeddings are frozen by default: it is cheaper on CPU, and it keeps that matrix identical across owners, so
merging it is exact whatever the method. A folder that already holds a model fine-tuned with the same settings on
the same data is left as it is (reruns skip the work).

:func:`finetune_multitask` trains one body with a head per task on several data sets at once: the multi-task
reference that merging tries to reach without pooling the data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fusion.checkpoint import atomic_folder, load_tokenizer, quiet_transformers
from fusion.data import batches, read_examples
from fusion.encode import Encoder, task_fields
from fusion.tasks import SEQUENCE_CLASSIFICATION, TASKS

SETTINGS_FILE = "gramfuse-finetune.json"


@dataclass(frozen=True)
class FinetuneSettings:
    labels: tuple[str, ...]
    epochs: int = 2
    learning_rate: float = 1e-4
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    freeze_word_embeddings: bool = True


def _record(base_dir: Path, data_file: Path, settings: FinetuneSettings) -> dict:
    record = {"base": str(base_dir), "data": hashlib.sha256(data_file.read_bytes()).hexdigest(), **asdict(settings)}
    record["labels"] = list(settings.labels)
    return record


def _is_cached(folder: Path, record: dict) -> bool:
    done = folder / SETTINGS_FILE
    return done.is_file() and json.loads(done.read_text()) == record


def finetune(base_dir: str | Path, data_file: str | Path, out_dir: str | Path, settings: FinetuneSettings,
             progress: bool = True) -> Path:
    """Fine-tune ``base_dir`` with a fresh classification head on ``data_file``; returns ``out_dir``."""
    return finetune_multitask(base_dir, {Path(out_dir).name: (Path(data_file), settings)}, Path(out_dir).parent,
                              progress=progress)[Path(out_dir).name]


def finetune_multitask(base_dir: str | Path, tasks: dict[str, tuple[Path, FinetuneSettings]], out_root: str | Path,
                       progress: bool = True) -> dict[str, Path]:
    """One body, one head per task, trained together on batches drawn in turn from each task's data.

    Writes ``out_root/<task>/`` for each task (the shared body with that task's head); the first task's settings
    give the epochs, learning rate and seed. Returns the folders.
    """
    from transformers import AutoModelForSequenceClassification

    base_dir, out_root = Path(base_dir), Path(out_root)
    records = {task: _record(base_dir, data, settings) for task, (data, settings) in tasks.items()}
    if len(tasks) > 1:
        for task in records:
            records[task]["trained_with"] = sorted(tasks)
    folders = {task: out_root / task for task in tasks}
    if all(_is_cached(folders[task], records[task]) for task in tasks):
        return folders

    quiet_transformers()  # fresh heads are meant to be initialised: transformers' note about them is noise here
    first = next(iter(tasks.values()))[1]
    torch.manual_seed(first.seed)
    tokenizer = load_tokenizer(base_dir)
    models, rows, encoders = {}, {}, {}
    body = None
    for task, (data_file, settings) in tasks.items():
        id2label = dict(enumerate(settings.labels))
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base_dir), num_labels=len(id2label), id2label=id2label,
            label2id={v: k for k, v in id2label.items()}, dtype=torch.float32, ignore_mismatched_sizes=True,
        )
        if body is None:
            body = model.base_model
            if settings.freeze_word_embeddings:
                model.get_input_embeddings().weight.requires_grad_(False)
        else:
            setattr(model, model.base_model_prefix, body)  # every task trains the same body
        models[task], rows[task] = model.train(), list(read_examples(data_file))
        encoders[task] = Encoder(TASKS[SEQUENCE_CLASSIFICATION], tokenizer, model.config,
                                 max_length=settings.max_length, path=data_file)
    unique = {id(p): p for m in models.values() for p in m.parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(unique.values(), lr=first.learning_rate)

    steps = [(task, epoch) for epoch in range(first.epochs) for task in tasks
             for _ in range(-(-len(rows[task]) // tasks[task][1].batch_size))]
    random.Random(first.seed).shuffle(steps)
    streams = {}
    with tqdm(total=len(steps), desc=f"fine-tune {', '.join(tasks)}", unit="step", disable=not progress) as bar:
        for task, epoch in steps:
            if (task, epoch) not in streams:
                shuffled = random.Random(first.seed + epoch).sample(rows[task], len(rows[task]))
                settings = tasks[task][1]
                streams[task, epoch] = batches(iter(shuffled), encoders[task], batch_size=settings.batch_size)
            loss = models[task](**next(streams[task, epoch])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(task=task, loss=f"{loss.item():.3f}")
    for task, model in models.items():
        model.eval()
        with atomic_folder(folders[task], overwrite=True) as staging:
            model.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
            (staging / SETTINGS_FILE).write_text(json.dumps(records[task], indent=2))
    return folders


@dataclass(frozen=True)
class LanguageModelSettings:
    """A full fine-tune of a causal LM: ``steps`` AdamW steps on batches of ``batch_size`` passages."""

    steps: int = 25
    learning_rate: float = 5e-5
    batch_size: int = 8
    max_length: int = 64
    seed: int = 0
    lora_rank: int = 0  # above 0: train a peft LoRA adapter of this rank on ``lora_targets``
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def finetune_causal_lm(base_dir: str | Path, data_file: str | Path, out_dir: str | Path,
                       settings: LanguageModelSettings = LanguageModelSettings(), progress: bool = True) -> Path:
    """Fine-tune every weight of the causal LM ``base_dir`` (or, with ``settings.lora_rank``, a LoRA adapter of
    it, saved as a peft adapter folder naming ``base_dir``) on the passages of ``data_file`` (``{"text"}`` rows),
    cycling through them in a seeded order; writes and returns ``out_dir`` (left as it is when already done)."""
    from fusion.checkpoint import load_model
    from fusion.tasks import CAUSAL_LM

    base_dir, data_file, out_dir = Path(base_dir), Path(data_file), Path(out_dir)
    record = {"base": str(base_dir), "data": hashlib.sha256(data_file.read_bytes()).hexdigest(), **asdict(settings)}
    if _is_cached(out_dir, record):
        return out_dir
    torch.manual_seed(settings.seed)
    model, _ = load_model(base_dir, CAUSAL_LM)
    model = model.float().train()
    if settings.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank,
                                                 target_modules=list(settings.lora_targets), task_type="CAUSAL_LM"))
        model.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
    tokenizer = load_tokenizer(base_dir)
    rows = list(read_examples(data_file, task_fields(TASKS[CAUSAL_LM])))
    encoder = Encoder(TASKS[CAUSAL_LM], tokenizer, model.config, max_length=settings.max_length, path=data_file)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate)
    order: list = []
    with tqdm(total=settings.steps, desc=f"fine-tune {out_dir.name}", unit="step", disable=not progress) as bar:
        for step in range(settings.steps):
            if len(order) < settings.batch_size:
                order += random.Random(settings.seed + step).sample(rows, len(rows))
            group, order = order[: settings.batch_size], order[settings.batch_size :]
            loss = model(**encoder(group)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with atomic_folder(out_dir, overwrite=True) as staging:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        (staging / SETTINGS_FILE).write_text(json.dumps(record, indent=2))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("base_dir", metavar="BASE_DIR")
    parser.add_argument("data_file", metavar="DATA_FILE")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    parser.add_argument("--labels", required=True, help="comma-separated label names, in class-index order")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-word-embeddings", action="store_true", help="do not freeze the word embeddings")
    args = parser.parse_args(argv)
    settings = FinetuneSettings(
        tuple(args.labels.split(",")), args.epochs, args.learning_rate, args.batch_size, args.max_length, args.seed,
        not args.train_word_embeddings,
    )
    from fusion.errors import GramfuseError

    try:
        print(finetune(args.base_dir, args.data_file, args.output, settings))
    except GramfuseError as error:
        print(f"finetune: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
