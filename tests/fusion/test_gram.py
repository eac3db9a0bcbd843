"""Gram statistics: equal to the naive X^T X of every layer, shared inputs found, pads excluded, triangle kept."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import layer_inputs, tiny_model, tokenizer

from fusion.gram import CONV1D, LINEAR, GramAccumulator, collect_statistics
from fusion.statistics import pack_upper, unpack_upper

SENTENCES = ["good movie", "the plot was slow and boring and the actor never smiled", "fine", "quite a great story"]


def encode(texts):
    return dict(tokenizer()(texts, padding=True, return_tensors="pt"))


@settings(deadline=None, max_examples=40)
@given(dim=st.one_of(st.integers(1, 40), st.integers(250, 600)), seed=st.integers(0, 10_000))
def test_pack_unpack_round_trip(dim, seed):
    """Packing goes by blocks of rows (256): sizes around and across block edges, against one triu_indices."""
    x = torch.randn(dim + 3, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    full = x.T @ x
    packed = pack_upper(full)
    rows, cols = torch.triu_indices(dim, dim)
    assert torch.equal(packed, full[rows, cols])
    assert torch.equal(unpack_upper(packed, dim), full.triu() + full.triu(1).T)


@settings(deadline=None, max_examples=25)
@given(dim=st.integers(1, 400), rows=st.integers(0, 50), batches=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_block_triangle_accumulator_equals_full_product(dim, rows, batches, seed):
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.randn(rows, dim, generator=generator, dtype=torch.float64) for _ in range(batches)]
    accumulator = GramAccumulator(dim, torch.float64)
    for part in parts:
        accumulator.add(part)
    stacked = torch.cat(parts)
    assert accumulator.token_count == rows * batches
    torch.testing.assert_close(unpack_upper(accumulator.packed(), dim), stacked.T @ stacked, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("kind", ["bert", "distilbert", "gpt2", "t5"])
def test_every_layer_gram_equals_naive_inputs_product(kind):
    """Shared Grams equal per-module Grams: each module's Gram is its own inputs' X^T X (float64 model: exact)."""
    model = tiny_model(kind).double()
    batch = encode(SENTENCES)
    stats = collect_statistics(model, [batch])
    naive = layer_inputs(model, [batch])
    assert set(stats.modules) == set(naive)
    for module, info in stats.modules.items():
        torch.testing.assert_close(stats.full_gram(info.gram), naive[module].T @ naive[module], rtol=1e-10, atol=1e-9)


def test_padding_does_not_change_a_gram():
    model = tiny_model("bert")
    padded = collect_statistics(model, [encode(SENTENCES)])
    alone = collect_statistics(model, [encode([text]) for text in SENTENCES])
    assert padded.token_counts == alone.token_counts
    real_tokens = int(encode(SENTENCES)["attention_mask"].sum())
    assert padded.token_counts["bert.encoder.layer.0.attention.self.query"] == real_tokens
    for key in padded.grams:
        torch.testing.assert_close(padded.grams[key], alone.grams[key], rtol=1e-5, atol=1e-4)


def test_counting_pads_would_change_the_gram():
    """The check above can fail: without the mask, pad positions do enter the Gram."""
    model = tiny_model("bert")
    batch = encode(SENTENCES)
    unmasked = {k: v for k, v in batch.items() if k != "attention_mask"}
    masked_stats = collect_statistics(model, [batch])
    unmasked_stats = collect_statistics(model, [unmasked])
    key = "bert.encoder.layer.0.attention.self.query"
    assert unmasked_stats.token_counts[key] > masked_stats.token_counts[key]


def shared(stats):
    return {module: info.gram for module, info in stats.modules.items() if module != info.gram}


def test_bert_layout_query_key_value_share_one_gram():
    stats = collect_statistics(tiny_model("bert"), [encode(SENTENCES)])
    for layer in range(2):
        prefix = f"bert.encoder.layer.{layer}.attention.self."
        assert stats.modules[prefix + "key"].gram == prefix + "query"
        assert stats.modules[prefix + "value"].gram == prefix + "query"
    assert len(shared(stats)) == 4
    assert all(info.kind == LINEAR for info in stats.modules.values())
    assert len(stats.grams) == len(stats.modules) - 4


def test_distilbert_layout():
    stats = collect_statistics(tiny_model("distilbert"), [encode(SENTENCES)])
    prefix = "distilbert.transformer.layer.0.attention."
    assert shared(stats)[prefix + "k_lin"] == prefix + "q_lin"
    assert shared(stats)[prefix + "v_lin"] == prefix + "q_lin"
    assert "pre_classifier" in stats.grams and "classifier" in stats.grams


def test_gpt2_layout_conv1d_layers_are_hooked_with_their_orientation():
    model = tiny_model("gpt2")
    stats = collect_statistics(model, [encode(SENTENCES)])
    assert stats.modules["transformer.h.0.attn.c_attn"].kind == CONV1D
    assert stats.modules["score"].kind == LINEAR
    # Conv1D stores in x out: the Gram's dimension is the weight's first axis.
    weight = dict(model.named_modules())["transformer.h.0.mlp.c_proj"].weight
    assert stats.dims["transformer.h.0.mlp.c_proj"] == weight.shape[0]
    assert shared(stats) == {}  # c_attn is already one fused layer


def test_t5_layout_cross_attention_keys_values_share_the_encoder_output_across_layers():
    stats = collect_statistics(tiny_model("t5"), [encode(SENTENCES)])
    key = "transformer.decoder.block.0.layer.1.EncDecAttention.k"
    for layer in range(2):
        for name in ("k", "v"):
            assert stats.modules[f"transformer.decoder.block.{layer}.layer.1.EncDecAttention.{name}"].gram == key
        prefix = f"transformer.decoder.block.{layer}.layer.0.SelfAttention."
        assert stats.modules[prefix + "v"].gram == prefix + "q"


def test_counts_and_fingerprint():
    model = tiny_model("bert")
    stats = collect_statistics(model, [encode(SENTENCES[:2]), encode(SENTENCES[2:])])
    assert stats.example_count == 4
    assert stats.token_counts["classifier"] == 4  # the pooled vector: one row per example
    other = collect_statistics(tiny_model("bert", seed=1), [encode(SENTENCES)])
    assert stats.fingerprint != other.fingerprint


def test_model_left_in_its_training_mode_and_without_gradients():
    model = tiny_model("bert").train()
    collect_statistics(model, [encode(SENTENCES)])
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_plain_pytorch_model_and_tensor_batches():
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    x = torch.randn(7, 3)
    stats = collect_statistics(model, [x[:4], x[4:]])
    torch.testing.assert_close(stats.full_gram("0"), (x.T @ x).double(), rtol=1e-5, atol=1e-5)
    hidden = torch.relu(model[0](x))
    torch.testing.assert_close(stats.full_gram("2"), (hidden.T @ hidden).double(), rtol=1e-5, atol=1e-5)
