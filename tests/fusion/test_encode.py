"""Encoding under careless input: a --max-length beyond the model's positions, and texts far longer than any
example needs."""

import json

from helpers import save_owner, tiny_model, tokenizer

from fusion.cli import main
from fusion.data import read_examples
from fusion.encode import CHARS_PER_TOKEN, Encoder, position_limit, task_fields
from fusion.statistics import load_statistics
from fusion.tasks import TASKS


def test_max_length_beyond_the_models_positions_is_capped_with_a_warning(tmp_path, caplog):
    model_dir = save_owner(tiny_model("bert"), tmp_path / "model")  # 64 positions
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(["good film"] * 150), "label": i % 2}) + "\n"
                            for i in range(3)))
    assert main(["stats", str(model_dir), str(data), "--max-length", "128", "--quiet"]) == 0  # crashed before
    assert "exceeds the 64 positions the model has" in caplog.text
    stats = load_statistics(model_dir / "gramfuse-stats.safetensors")
    assert max(stats.token_counts.values()) == 3 * 64


def test_roberta_positions_start_after_the_padding_index_and_t5_has_no_limit():
    from transformers import RobertaConfig, T5Config

    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert position_limit(T5Config()) is None  # relative positions: nothing to cap


class Recording:
    """The real tokenizer, recording the longest text it was handed."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __setattr__(self, name, value):
        if name in ("tokenizer", "longest"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.tokenizer, name, value)

    def __call__(self, texts, *args, **kwargs):
        self.longest = max([self.longest, *(len(t) for t in texts)])
        return self.tokenizer(texts, *args, **kwargs)


def test_a_huge_text_is_cut_before_tokenising_and_encodes_as_its_start(tmp_path):
    model = tiny_model("bert")
    huge = "a good film with a slow plot " * 40_000  # 1.2 MB on one line
    data = tmp_path / "huge.jsonl"
    data.write_text(json.dumps({"text": huge, "label": 1}) + "\n")
    task = TASKS["sequence-classification"]
    recording = Recording(tokenizer())
    encoder = Encoder(task, recording, model.config, max_length=32, path=data)
    batch = encoder(list(read_examples(data, task_fields(task))))
    assert recording.longest == 32 * CHARS_PER_TOKEN
    reference = tokenizer()(huge[:5000], truncation=True, max_length=32, return_tensors="pt")
    assert batch["input_ids"].tolist() == reference["input_ids"].tolist()
