"""The LLM setting of ``examples.compare``: three owners of SmolLM2-135M-Instruct, each fully fine-tuned on one real
text domain (Lee news articles, ACL papers, Wikipedia), merged in one simulated Flower round; held-out perplexity
per domain for the base, each owner's own model, every merge, a model fine-tuned on the pooled data and an output
ensemble of the owners' models.

    python -m examples.compare --setting llm [--full]

Owners fine-tune every weight, not a LoRA adapter: a 135 M model's full fine-tune takes about a minute here, and
it is the case where the merge has the most to reconcile (every layer moved).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from clients.finetune import LanguageModelSettings, finetune_causal_lm
from examples.assets import TEXT_DOMAINS, smollm2_dir, text_domain, write_jsonl
from examples.owners import Owner, say, split_files
from fusion.checkpoint import load_model, load_tokenizer
from fusion.workflows import DataSettings, evaluate_folder, task_batches

METHODS = ["average", "task-arithmetic", "ties", "regmean:alpha=0.5", "regmean:alpha=0.9", "regmean",
           "regmean:tied=embedding"]
DATA = DataSettings(max_length=96, batch_size=16)  # a passage is 48 words: about 65 tokens, none cut


@dataclass(frozen=True)
class Size:
    train: int  # passages per owner (48 words each)
    test: int
    steps: int  # AdamW steps of 8 passages

    @property
    def name(self) -> str:
        return "full" if self == SIZES["full"] else "default"


SIZES = {"default": Size(train=200, test=64, steps=25), "full": Size(train=400, test=128, steps=50)}


def prepare_owners(workdir: Path, size: Size) -> list[Owner]:
    base = smollm2_dir()
    owners = []
    for seed, domain in enumerate(TEXT_DOMAINS):
        train, test = split_files(domain, text_domain(domain), workdir, train=size.train, test=size.test)
        say(f"owner {domain}: {size.train} passages; a full fine-tune of {size.steps} steps "
            "(cached after the first run)")
        model = finetune_causal_lm(base, train, workdir / "owners" / domain,
                                   LanguageModelSettings(steps=size.steps, seed=seed))
        owners.append(Owner(domain, domain, (), model, train, test))
    return owners


def pooled_model(owners: list[Owner], workdir: Path, size: Size) -> Path:
    """The reference merging tries to reach without the data: one fine-tune on every owner's passages, as many
    steps as the owners took together."""
    rows = [json.loads(line) for o in owners for line in o.train.read_text().splitlines()]
    pooled = write_jsonl(rows, workdir / "data" / "pooled-train.jsonl")
    say("pooled reference: one fine-tune on all owners' passages (cached after the first run)")
    return finetune_causal_lm(smollm2_dir(), pooled, workdir / "owners" / "pooled",
                              LanguageModelSettings(steps=size.steps * len(owners)))


def ensemble_perplexity(folders: list[Path], test: Path) -> float:
    """Perplexity of the mean of the models' next-token distributions (every model's forward pass per batch)."""
    models = [load_model(folder)[0] for folder in folders]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in task_batches(models[0], load_tokenizer(folders[0]), test, DATA, True):
            labels = batch.pop("labels")[:, 1:]
            probs = torch.stack([torch.softmax(m(**batch).logits[:, :-1].double(), -1) for m in models]).mean(0)
            kept = labels != -100
            total -= float(probs[kept].gather(1, labels[kept].unsqueeze(1)).log().sum())
            tokens += int(kept.sum())
    return math.exp(total / tokens)


def run(workdir: Path, size: Size) -> dict:
    from examples.compare import federate

    owners = prepare_owners(workdir, size)
    tests = {o.domain: o.test for o in owners}
    candidates = {"base (SmolLM2-135M-Instruct)": smollm2_dir()}
    candidates.update({f"own model ({o.name})": o.model for o in owners})
    candidates["fine-tuned on pooled data"] = pooled_model(owners, workdir, size)
    merged = federate(owners, workdir / "federated-llm", methods=METHODS, base=smollm2_dir(), what="statistics",
                      extra="part-mb=512")
    candidates.update({label: folders[owners[0].name] for label, folders in merged.items()})
    scores = {}
    for name, folder in candidates.items():
        scores[name] = {domain: evaluate_folder(folder, test, settings=DATA, progress=False)["perplexity"]
                        for domain, test in tests.items()}
        say(f"evaluated {name}")
    scores["output ensemble (own models)"] = {domain: ensemble_perplexity([o.model for o in owners], test)
                                              for domain, test in tests.items()}
    return {"domains": list(tests), "scores": scores}


def table(result: dict) -> str:
    """Perplexity per domain, the mean, and each model's excess over the owners' own models (own = 0) relative to
    averaging's (average = 1): how much of averaging's loss a method recovers."""
    domains, scores = result["domains"], result["scores"]
    own = {d: scores[f"own model ({d})"][d] for d in domains}
    average = scores["average"]
    lines = ["| model | " + " | ".join(domains) + " | mean | excess vs averaging |", "|---" * (len(domains) + 3) + "|"]
    for name, by_domain in scores.items():
        cells = [f"{by_domain[d]:.2f}" for d in domains]
        mean = sum(by_domain.values()) / len(by_domain)
        excess = sum(by_domain[d] - own[d] for d in domains) / sum(average[d] - own[d] for d in domains)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.2f} | {excess:.2f} |")
    from examples.compare import domain_retention_table

    return "\n".join(lines) + "\n\n" + domain_retention_table(domains, scores)

