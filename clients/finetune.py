"""Fine-tune a copy of the shared pretrained model on a site's own data, as a data site would before merging.

    python -m clients.finetune BASE_DIR DATA_FILE -o OUT_DIR --labels negative,positive [--epochs 1]

Word embeddings are frozen by default: it is cheaper on CPU, and it keeps that matrix identical across owners, so
merging it is exact whatever the method. A folder that already holds a model fine-tuned with the same settings is
left as it is (reruns skip the work).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fusion.checkpoint import atomic_folder, load_tokenizer, quiet_transformers
from fusion.data import batches, label_index, read_examples

SETTINGS_FILE = "gramfuse-finetune.json"


@dataclass(frozen=True)
class FinetuneSettings:
    labels: tuple[str, ...]
    epochs: int = 1
    learning_rate: float = 1e-4
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    freeze_word_embeddings: bool = True


def _data_fingerprint(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def finetune(base_dir: str | Path, data_file: str | Path, out_dir: str | Path, settings: FinetuneSettings,
             progress: bool = True) -> Path:
    """Fine-tune ``base_dir`` with a fresh classification head on ``data_file``; returns ``out_dir``."""
    from transformers import AutoModelForSequenceClassification

    base_dir, data_file, out_dir = Path(base_dir), Path(data_file), Path(out_dir)
    record = {"base": str(base_dir), "data": _data_fingerprint(data_file), **asdict(settings)}
    record["labels"] = list(settings.labels)
    done = out_dir / SETTINGS_FILE
    if done.is_file() and json.loads(done.read_text()) == record:
        return out_dir

    quiet_transformers()  # the fresh head is meant to be initialised: transformers' note about it is noise here
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    id2label = dict(enumerate(settings.labels))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base_dir), num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
        dtype=torch.float32,
    )
    if settings.freeze_word_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    tokenizer = load_tokenizer(base_dir)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate)
    rows = list(read_examples(data_file))
    label_of = lambda example: label_index(example, model.config.label2id, model.config.num_labels, data_file)  # noqa: E731
    total_steps = settings.epochs * -(-len(rows) // settings.batch_size)
    model.train()
    with tqdm(total=total_steps, desc=f"fine-tune {out_dir.name}", unit="step", disable=not progress) as bar:
        for epoch in range(settings.epochs):
            random.Random(settings.seed + epoch).shuffle(rows)
            for batch in batches(iter(rows), tokenizer, batch_size=settings.batch_size,
                                 max_length=settings.max_length, label_of=label_of):
                loss = model(**batch).loss
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
    parser.add_argument("--epochs", type=int, default=1)
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
