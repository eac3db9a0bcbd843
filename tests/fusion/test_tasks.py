"""Task types (causal LM, token classification, sentence pairs, regression) from the statistics to the loaded merge:
every family at the pooled least-squares optimum, the tie rule, task detection and each task's bad data."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import (TAGS, VOCAB, layer_inputs, perturbed, pooled_least_squares, pooled_objective, texts,
                     tiny_family, tokenizer, weight_t, word_rows, write_task_data)

from fusion.checkpoint import float_state
from fusion.cli import main
from fusion.encode import Encoder, task_fields
from fusion.data import read_examples
from fusion.errors import DataError, GramfuseError
from fusion.gram import collect_statistics, linear_modules
from fusion.merge import merge_states
from fusion.methods import OwnerState, get_method
from fusion.tasks import CAUSAL_LM, SEQ2SEQ, TASKS, TOKEN_CLASSIFICATION, model_task, task_of

def batch_for(model, rng: random.Random, tmp_path, name: str):
    """One batch of the model's own task, encoded as the statistics pass encodes it."""
    task = model_task(model)
    path = write_task_data(tmp_path / f"{name}.jsonl", task.name, rng, 20)
    encoder = Encoder(task, tokenizer(), model.config, max_length=32, path=path)
    return encoder(list(read_examples(path, task_fields(task), require_labels=True)))


FAMILIES = ["llama-lm", "llama-lm-untied", "qwen2-lm", "mistral-lm", "gpt2-lm", "llama-token", "bert-token",
            "t5-seq2seq"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_merges_every_layer_to_the_pooled_least_squares_optimum(tmp_path, family):
    """GQA attention, q/k/v biases, Conv1D, tied and untied LM heads, token heads: each layer's merge attains the
    pooled objective of an independent solver on the owners' own layer inputs over real tokens."""
    rng = random.Random(family)
    base = tiny_family(family)
    owners, inputs, batches = [], [], []
    for i in range(3):
        owner = perturbed(base, seed=i)
        batch = batch_for(owner, rng, tmp_path, f"o{i}")
        stats = collect_statistics(owner, [batch])
        owners.append((owner, OwnerState(f"o{i}", float_state(owner), stats)))
        inputs.append(layer_inputs(owner, [batch]))
        batches.append(batch)
        head = "lm_head" if "lm" in family or "seq2seq" in family else "score" if "llama" in family else "classifier"
        side = "decoder_attention_mask" if "seq2seq" in family else "attention_mask"
        assert stats.token_counts[stats.modules[head].gram] == int(batch[side].sum())  # real tokens, no pad
        assert all(stats.pads_excluded.values())
    merged = merge_states([state for _, state in owners], get_method("regmean")).params
    modules = owners[0][1].statistics.modules
    for name, _, kind in linear_modules(base):
        xs = [owner_inputs[name] for owner_inputs in inputs]
        targets = [weight_t(dict(owner.named_modules())[name].weight.detach(), kind) for owner, _ in owners]
        optimum = pooled_objective(xs, targets, pooled_least_squares(xs, targets))
        achieved = pooled_objective(xs, targets, weight_t(merged[modules[name].weight], kind))
        assert achieved - optimum <= 1e-6 * optimum + 1e-12, name


def test_a_tied_head_is_one_tensor_stored_under_the_embeddings_name():
    model = tiny_family("llama-lm")
    stats = collect_statistics(model, [dict(tokenizer()(["a good film"], return_tensors="pt"))])
    assert stats.modules["lm_head"].weight == "model.embed_tokens.weight"
    assert "lm_head.weight" not in float_state(model)
    untied = tiny_family("llama-lm-untied")
    assert "lm_head.weight" in float_state(untied)


def save(model, path):
    model.float().save_pretrained(str(path))
    tokenizer().save_pretrained(str(path))
    return path


def lm_federation(tmp_path, family="llama-lm", owners=2):
    rng = random.Random(1)
    base = tiny_family(family)
    dirs, data = [], []
    for i in range(owners):
        dirs.append(save(perturbed(base, seed=20 + i), tmp_path / f"owner{i}"))
        path = tmp_path / f"data{i}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(rng, 30)))
        data.append(path)
    return dirs, data


def gramfuse(*args):
    return main([*map(str, args), "--quiet"])


@pytest.mark.parametrize("tied", ["head", "embedding"])
def test_causal_lm_through_the_cli_keeps_the_tie_under_the_chosen_rule(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    from fusion.statistics import load_statistics

    dirs, data = lm_federation(tmp_path)
    for model_dir, data_file in zip(dirs, data):
        assert gramfuse("stats", model_dir, data_file) == 0
    assert gramfuse("merge", *dirs, "-o", tmp_path / "merged", "--tied", tied) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert merged.config.architectures == ["LlamaForCausalLM"]
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()  # the tie survives
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    stats = [load_statistics(d / "gramfuse-stats.safetensors") for d in dirs]
    owners = [AutoModelForCausalLM.from_pretrained(str(d)).double() for d in dirs]
    embeddings = [o.model.embed_tokens.weight.detach() for o in owners]
    counts = [s.example_count for s in stats]
    if tied == "embedding":  # the count-weighted average, as every other non-linear tensor
        expected = sum(c * e for c, e in zip(counts, embeddings)) / sum(counts)
    else:  # the head's RegMean solution from the head's Grams
        grams = [s.full_gram(s.modules["lm_head"].gram) for s in stats]
        expected = torch.linalg.solve(sum(grams), sum(g @ e.T for g, e in zip(grams, embeddings))).T
    torch.testing.assert_close(merged.model.embed_tokens.weight.double(), expected.float().double(), rtol=1e-5,
                               atol=1e-6)


def test_gpt2_lm_head_model_with_conv1d_merges_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    dirs, data = lm_federation(tmp_path, "gpt2-lm", owners=2)
    for model_dir, data_file in zip(dirs, data):
        assert gramfuse("stats", model_dir, data_file) == 0
    assert gramfuse("merge", *dirs, "-o", tmp_path / "merged") == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert type(merged).__name__ == "GPT2LMHeadModel"
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()


def test_a_llama_token_classifier_is_merged_and_saved_as_one(tmp_path):
    """Merged as what it is: Grams over every real token, the score bias kept, saved as LlamaForTokenClassification."""
    from transformers import AutoModelForTokenClassification

    from fusion.statistics import load_statistics

    rng = random.Random(3)
    base = tiny_family("llama-token")
    dirs = []
    for i in range(2):
        model_dir = save(perturbed(base, seed=i), tmp_path / f"owner{i}")
        path = tmp_path / f"data{i}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in word_rows(rng, 25)))
        assert gramfuse("stats", model_dir, path) == 0
        stats = load_statistics(model_dir / "gramfuse-stats.safetensors")
        assert stats.token_counts[stats.modules["score"].gram] == stats.token_counts[stats.modules[
            "model.layers.0.self_attn.q_proj"].gram] > stats.example_count  # every token, not the last one
        dirs.append(model_dir)
    assert gramfuse("merge", *dirs, "-o", tmp_path / "merged") == 0
    merged = AutoModelForTokenClassification.from_pretrained(str(tmp_path / "merged"))
    assert type(merged).__name__ == "LlamaForTokenClassification"
    assert merged.config.id2label == {i: t for i, t in enumerate(TAGS)}
    owners = [AutoModelForTokenClassification.from_pretrained(str(d)) for d in dirs]
    counts = [load_statistics(d / "gramfuse-stats.safetensors").example_count for d in dirs]
    expected_bias = sum(c * o.score.bias.detach().double() for c, o in zip(counts, owners)) / sum(counts)
    torch.testing.assert_close(merged.score.bias.detach().double(), expected_bias, rtol=1e-6, atol=1e-7)
    assert gramfuse("evaluate", tmp_path / "merged", tmp_path / "data0.jsonl") == 0


@pytest.mark.parametrize("architecture, task", [
    ("LlamaForCausalLM", CAUSAL_LM), ("GPT2LMHeadModel", CAUSAL_LM), ("Qwen2ForCausalLM", CAUSAL_LM),
    ("BertForTokenClassification", TOKEN_CLASSIFICATION), ("LlamaForTokenClassification", TOKEN_CLASSIFICATION),
    ("BertForSequenceClassification", "sequence-classification"),
])
def test_the_task_comes_from_the_architecture(architecture, task):
    assert task_of(type("C", (), {"architectures": [architecture]})()).name == task


@pytest.mark.parametrize("architecture", ["BertForMaskedLM", "BertForPreTraining", "BertModel"])
def test_an_unsupported_architecture_names_itself_and_lists_the_supported(architecture):
    with pytest.raises(GramfuseError) as error:
        task_of(type("C", (), {"architectures": [architecture]})())
    message = str(error.value)
    assert architecture in message and "not supported" in message
    assert all(name in message for name in TASKS)


def test_a_config_without_architectures_asks_for_task_and_task_overrides():
    empty = type("C", (), {"architectures": None})()
    with pytest.raises(GramfuseError, match="--task"):
        task_of(empty)
    assert task_of(empty, CAUSAL_LM).name == CAUSAL_LM


def test_a_causal_lm_is_no_longer_called_an_untrained_classifier(tmp_path, capsys):
    dirs, data = lm_federation(tmp_path, owners=1)
    assert gramfuse("stats", dirs[0], data[0], "--task", "sequence-classification") == 1
    err = capsys.readouterr().err
    assert "score.weight" in err and "--task" in err


@pytest.mark.parametrize("task, rows, fragments", [
    (TOKEN_CLASSIFICATION, [{"tokens": ["a", "b"], "tags": ["O"]}], ["1 tags", "2 words", "align"]),
    (TOKEN_CLASSIFICATION, [{"tokens": "a b", "tags": ["O", "O"]}], ["'tokens'", "list of words"]),
    (TOKEN_CLASSIFICATION, [{"tokens": ["a"], "tags": "O"}], ["'tags'", "list of tags"]),
    (TOKEN_CLASSIFICATION, [{"words": ["a"], "tags": ["O"]}], [":1:", "missing field 'tokens'"]),
    (TOKEN_CLASSIFICATION, [{"tokens": ["a"], "tags": ["B-Z"]}], ["'B-Z'", "model's labels"]),
    (CAUSAL_LM, [{"text": "fine"}, {"text": 3}], [":2:", "'text' must be text"]),
    (CAUSAL_LM, [{"body": "no text"}], ["missing field 'text'"]),
])
def test_each_task_names_its_bad_data(tmp_path, task, rows, fragments):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    model = tiny_family("llama-token" if task == TOKEN_CLASSIFICATION else "llama-lm")
    encoder = Encoder(TASKS[task], tokenizer(), model.config, max_length=16, path=path)
    with pytest.raises(DataError) as error:
        encoder(list(read_examples(path, task_fields(TASKS[task]))))
    assert all(fragment in str(error.value) for fragment in fragments), str(error.value)


def test_token_tags_go_on_each_words_first_sub_token_only(tmp_path):
    path = tmp_path / "words.jsonl"
    path.write_text(json.dumps({"tokens": ["unbelievably", "good"], "tags": ["B-X", "O"]}) + "\n")
    model = tiny_family("bert-token")
    task = TASKS[TOKEN_CLASSIFICATION]
    batch = Encoder(task, tokenizer(), model.config, max_length=16, path=path)(
        list(read_examples(path, task_fields(task))))
    pieces = tokenizer().convert_ids_to_tokens(batch["input_ids"][0])
    labels = batch["labels"][0].tolist()
    assert len(pieces) > 4  # [CLS] un ##bel… good [SEP]: the first word has several pieces
    assert labels[0] == -100 and labels[-1] == -100  # special tokens
    assert labels[1] == TAGS.index("B-X") and all(label == -100 for label in labels[2:-2])
    assert labels[-2] == TAGS.index("O")


def test_sentence_pairs_and_a_regression_label(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path / "pairs.jsonl"
    rows = [{"text": "a good film", "text_pair": "a fine movie", "label": 4.2},
            {"text": "bad plot", "text_pair": "the food", "label": "0.5"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, num_labels=1)
    model = BertForSequenceClassification(config).eval()
    task = TASKS["sequence-classification"]
    batch = Encoder(task, tokenizer(), config, max_length=32, path=path)(list(read_examples(path, task_fields(task))))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == pytest.approx([4.2, 0.5])
    assert int(batch["token_type_ids"].max()) == 1  # the second text is a second segment
    path.write_text(json.dumps({"text": "x", "text_pair": "y", "label": "high"}) + "\n")
    with pytest.raises(DataError, match="not a number"):
        Encoder(task, tokenizer(), config, max_length=32, path=path)(list(read_examples(path, task_fields(task))))
    path.write_text(json.dumps({"text": "x", "text_pair": "y", "label": 1}) + "\n" +
                    json.dumps({"text": "x", "label": 1}) + "\n")
    with pytest.raises(DataError, match=":2:.*pairs throughout"):
        list(read_examples(path, task_fields(task)))
    assert model(**{k: v for k, v in batch.items() if k != "labels"}).logits.shape == (2, 1)


def test_sentence_pair_regressors_through_the_cli_with_fisher(tmp_path, capsys):
    """STS-B's shape: pairs, a score label, num_labels 1; statistics (with the Gaussian Fisher), merge, evaluate."""
    from helpers import save_owner, tiny_model
    from transformers import AutoModelForSequenceClassification

    from fusion.statistics import load_statistics

    rng = random.Random(5)
    base = tiny_model("bert", num_labels=1)
    dirs, data = [], []
    for i in range(2):
        dirs.append(save_owner(perturbed(base, seed=30 + i), tmp_path / f"owner{i}"))
        rows = [{"text": t, "text_pair": p, "label": round(rng.uniform(0, 5), 1)}
                for t, p in zip(texts(rng, 24), texts(rng, 24))]
        data.append(tmp_path / f"pairs{i}.jsonl")
        data[-1].write_text("".join(json.dumps(row) + "\n" for row in rows))
        assert gramfuse("stats", dirs[-1], data[-1], "--fisher") == 0
        stats = load_statistics(dirs[-1] / "gramfuse-stats.safetensors")
        assert stats.fisher and all(float(v.sum()) > 0 for v in stats.fisher.values() if v.numel() > 1)
    for method in ("regmean", "fisher"):
        assert gramfuse("merge", *dirs, "-o", tmp_path / method, "--method", method) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "regmean"))
    assert merged.config.num_labels == 1
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "regmean"), str(data[0]), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"pearson", "spearman", "mse"} and result["examples"] == 24


def test_t5_seq2seq_through_the_cli_with_fisher_and_rouge(tmp_path, capsys):
    """Sources and targets: both masks counted, the tied shared embedding kept, ROUGE and perplexity scored."""
    from transformers import AutoModelForSeq2SeqLM

    from fusion.statistics import load_statistics

    rng = random.Random(9)
    base = tiny_family("t5-seq2seq")
    dirs, data = [], []
    for i in range(2):
        dirs.append(save(perturbed(base, seed=50 + i), tmp_path / f"owner{i}"))
        rows = [{"source": a, "target": b} for a, b in zip(texts(rng, 16), texts(rng, 16))]
        data.append(tmp_path / f"pairs{i}.jsonl")
        data[-1].write_text("".join(json.dumps(row) + "\n" for row in rows))
        assert gramfuse("stats", dirs[-1], data[-1], "--fisher") == 0
        stats = load_statistics(dirs[-1] / "gramfuse-stats.safetensors")
        encoder = stats.token_counts[stats.modules["encoder.block.0.layer.0.SelfAttention.q"].gram]
        decoder = stats.token_counts[stats.modules["decoder.block.0.layer.0.SelfAttention.q"].gram]
        cross = {stats.modules[f"decoder.block.{b}.layer.1.EncDecAttention.{m}"].gram for b in range(2) for m in "kv"}
        assert len(cross) == 1  # every decoder block's cross-attention keys and values read the encoder's output
        assert stats.token_counts[stats.modules["decoder.block.0.layer.1.EncDecAttention.k"].gram] == encoder
        assert encoder != decoder and all(stats.pads_excluded.values())
        assert stats.fisher and float(stats.fisher["decoder.block.0.layer.0.SelfAttention.q.weight"].sum()) > 0
    assert gramfuse("merge", *dirs, "-o", tmp_path / "merged") == 0
    merged = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "merged"))
    assert type(merged).__name__ == "T5ForConditionalGeneration"
    assert merged.lm_head.weight.data_ptr() == merged.shared.weight.data_ptr()
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "merged"), str(data[0]), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"rouge1", "rouge2", "rougeL", "perplexity"} and result["examples"] == 16
    assert 0.0 <= result["rouge1"] <= 1.0


def test_seq2seq_targets_must_be_text(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"source": "a text", "target": ["not", "text"]}) + "\n")
    with pytest.raises(DataError, match="'target' must be the target text"):
        list(read_examples(path, task_fields(TASKS[SEQ2SEQ])))
