"""The forgetting report: how much of each owner's own model a merge keeps, on that owner's held-out data.

Per owner, *retention* is the merged model's score divided by the owner's own model's score on the owner's data,
oriented so that 1.0 means "as good as its own model" and less means forgotten (for perplexity, where lower is
better, the owner's divided by the merged). Per layer, *linear CKA* (Kornblith et al., ICML 2019) compares the merged
model's and the owner's hidden states on the same examples (each example's states averaged over its real tokens):
1.0 where the merge represents the owner's data exactly as the owner's model does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# The score that stands for each kind of result, and whether higher is better: the first one a result carries.
PRIMARY_SCORES = (("accuracy", True), ("pearson", True), ("entity_f1", True), ("rougeL", True), ("perplexity", False))


def primary_score(scores: Mapping[str, Any]) -> tuple[str, bool]:
    for name, higher in PRIMARY_SCORES:
        if name in scores:
            return name, higher
    raise ValueError(f"no score to compare among {sorted(scores)}")


def retention(merged: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """``merged`` against ``own`` on the same data: the primary score of each and their ratio (1.0: kept all)."""
    name, higher = primary_score(own)
    merged_value, own_value = float(merged[name]), float(own[name])
    numerator, denominator = (merged_value, own_value) if higher else (own_value, merged_value)
    ratio = numerator / denominator if denominator else float("nan")  # an own model that scores 0: no ratio
    return {"score": name, "merged": merged_value, "own": own_value, "retention": ratio}


def linear_cka(first: torch.Tensor, second: torch.Tensor) -> float:
    """Linear CKA of two representations of the same ``n`` examples (``n x p`` and ``n x q``): invariant to
    rotations and to scaling either, 1.0 for representations equal up to those."""
    first = first.to(torch.float64) - first.to(torch.float64).mean(0)
    second = second.to(torch.float64) - second.to(torch.float64).mean(0)
    cross = torch.linalg.matrix_norm(second.T @ first) ** 2
    norms = torch.linalg.matrix_norm(first.T @ first) * torch.linalg.matrix_norm(second.T @ second)
    return float(cross / norms) if norms > 0 else float("nan")


def pooled_hidden_states(model: Any, batches: Iterable[Mapping[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Every layer's hidden states (the embeddings' output first), each example's averaged over its real tokens:
    one ``examples x width`` matrix per layer (a seq2seq model: the encoder's layers, then the decoder's)."""
    model.eval()
    device = next(model.parameters()).device
    pooled: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            seq2seq = model.config.is_encoder_decoder
            inputs = batch if seq2seq else {k: v for k, v in batch.items() if k != "labels"}
            out = model(**inputs, output_hidden_states=True)
            if seq2seq:
                target_mask = (batch["labels"] != -100).long()
                layers = [(h, batch["attention_mask"]) for h in out.encoder_hidden_states]
                layers += [(h, target_mask) for h in out.decoder_hidden_states]
            else:
                layers = [(h, batch["attention_mask"]) for h in out.hidden_states]
            for index, (states, mask) in enumerate(layers):
                weights = mask[..., : states.shape[1]].unsqueeze(-1).to(torch.float64)
                mean = (states.to(torch.float64) * weights).sum(1) / weights.sum(1).clamp_min(1.0)
                if index == len(pooled):
                    pooled.append([])
                pooled[index].append(mean.cpu())
    return [torch.cat(parts) for parts in pooled]


def owner_report(name: str, merged_scores: Mapping, own_scores: Mapping, merged_states: Sequence[torch.Tensor],
                 own_states: Sequence[torch.Tensor]) -> dict[str, Any]:
    return {"owner": name, **retention(merged_scores, own_scores),
            "cka": [linear_cka(m, o) for m, o in zip(merged_states, own_states)],
            "examples": int(own_scores.get("examples", 0))}


def forgetting_chart(report: Mapping[str, Any], path: str | Path) -> Path:
    """Retention per owner and CKA per layer per owner, as one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # an optional dependency: the report itself needs none
        raise ImportError("a chart needs matplotlib (pip install 'gramfuse[examples]')") from error
    owners = report["owners"]
    figure, (bars, lines) = plt.subplots(1, 2, figsize=(10, 4))
    names = [owner["owner"] for owner in owners]
    bars.bar(names, [owner["retention"] for owner in owners], color="tab:blue")
    bars.axhline(1.0, color="grey", linewidth=0.8)
    bars.set_ylabel(f"retention ({owners[0]['score']}, merged / own)" if owners else "retention")
    bars.set_title("what the merge keeps of each owner")
    for owner in owners:
        lines.plot(range(len(owner["cka"])), owner["cka"], marker="o", label=owner["owner"])
    lines.set_xlabel("layer (0: embeddings)")
    lines.set_ylabel("linear CKA, merged vs own")
    lines.set_ylim(0, 1.02)
    lines.legend()
    lines.set_title("representations, layer by layer")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
