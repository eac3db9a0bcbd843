"""Owner fine-tuning on tiny models: caching, frozen word embeddings, and the multi-task body shared by all heads."""

import torch
from helpers import save_owner, tiny_model, write_data
from transformers import AutoModelForSequenceClassification

from clients.finetune import FinetuneSettings, finetune, finetune_multitask


def test_finetune_freezes_word_embeddings_and_is_cached(tmp_path):
    base = save_owner(tiny_model("bert"), tmp_path / "base")
    data = write_data(tmp_path / "d.jsonl", 40, seed=0)
    settings = FinetuneSettings(labels=("negative", "positive"), epochs=1, learning_rate=1e-2)
    out = finetune(base, data, tmp_path / "owner", settings, progress=False)
    tuned = AutoModelForSequenceClassification.from_pretrained(str(out))
    original = AutoModelForSequenceClassification.from_pretrained(str(base))
    assert torch.equal(tuned.bert.embeddings.word_embeddings.weight, original.bert.embeddings.word_embeddings.weight)
    assert not torch.equal(tuned.bert.encoder.layer[0].output.dense.weight,
                           original.bert.encoder.layer[0].output.dense.weight)
    assert tuned.config.id2label == {0: "negative", 1: "positive"}
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    finetune(base, data, tmp_path / "owner", settings, progress=False)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # cached: not trained again


def test_multitask_trains_one_body_with_a_head_per_task(tmp_path):
    base = save_owner(tiny_model("bert"), tmp_path / "base")
    tasks = {
        "two": (write_data(tmp_path / "a.jsonl", 30, seed=0, num_labels=2), FinetuneSettings(("a", "b"), epochs=1)),
        "three": (write_data(tmp_path / "b.jsonl", 30, seed=1, num_labels=3),
                  FinetuneSettings(("x", "y", "z"), epochs=1)),
    }
    folders = finetune_multitask(base, tasks, tmp_path / "out", progress=False)
    two, three = (AutoModelForSequenceClassification.from_pretrained(str(folders[t])) for t in ("two", "three"))
    assert two.config.num_labels == 2 and three.config.num_labels == 3
    for name, value in two.bert.state_dict().items():
        assert torch.equal(value, three.bert.state_dict()[name]), name
    original = AutoModelForSequenceClassification.from_pretrained(str(base))
    assert not torch.equal(two.bert.encoder.layer[1].output.dense.weight,
                           original.bert.encoder.layer[1].output.dense.weight)
