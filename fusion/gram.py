"""Gram statistics of the inputs of every linear layer.

For each ``nn.Linear`` and Hugging Face ``Conv1D`` we accumulate ``X^T X`` over the real tokens that reach it (the
attention mask applied, so pads never count), in float64, in eval mode without gradients. Modules fed the very same
input tensor (BERT's query/key/value, LLaMA's gate/up, T5's cross-attention keys/values of every decoder layer) share
one Gram, computed once. Only the upper triangle is computed (block by block) and kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .checkpoint import tied_aliases
from .privacy import PrivacyError, PrivacySpec, clipped_record, clipped_rows, privatise
from .statistics import GramStatistics, ModuleInfo, pack_band, weights_fingerprint

LINEAR = "linear"
CONV1D = "conv1d"


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # plain PyTorch use without transformers
        return None
    return Conv1D


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every hookable layer as ``(name, module, kind)``, kind being ``linear`` or ``conv1d``."""
    conv1d = _conv1d_class()
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found.append((name, module, LINEAR))
        elif conv1d is not None and isinstance(module, conv1d):
            found.append((name, module, CONV1D))
    return found


def _block_edges(dim: int) -> list[int]:
    # Measured on 2 cores (benchmarks/bench_stats.py): blocks of about 96 to 192 columns keep the matmuls efficient
    # while skipping most of the lower triangle; b blocks cost (b + 1) / (2 b) of the full product.
    blocks = max(1, min(8, dim // 96))
    return [round(i * dim / blocks) for i in range(blocks + 1)]


@dataclass
class GramAccumulator:
    """A running float64 sum of ``X^T X`` of which only the upper block triangle is computed and kept.

    The sum lives as bands of rows, each from its diagonal block to the last column (:func:`_block_edges`): about
    (b + 1) / (2 b) of the full matrix for b bands, so a site holds little more than the packed triangles it will
    release, not full Grams beside them (for a Llama-7B-shaped model, about 25 GB of bands against 44 GB of full
    Grams)."""

    dim: int
    compute_dtype: torch.dtype = torch.float64
    token_count: int = 0
    edges: list[int] = field(init=False)
    bands: list[torch.Tensor] = field(init=False)

    device: torch.device | str = "cpu"

    def __post_init__(self) -> None:
        self.edges = _block_edges(self.dim)
        self.bands = [torch.zeros(stop - start, self.dim - start, dtype=torch.float64, device=self.device)
                      for start, stop in zip(self.edges[:-1], self.edges[1:])]

    def add(self, rows: torch.Tensor) -> None:
        """Add the rows (tokens x features) of one batch."""
        if rows.shape[0] == 0:
            return
        rows = rows.to(self.compute_dtype)
        for band, start, stop in zip(self.bands, self.edges[:-1], self.edges[1:]):
            # Products are float64 by default: a float32 product is off by ~1e-7 of the Gram's scale, enough to make
            # a nearly singular Gram indefinite. Either way batches are summed in float64.
            band += (rows[:, start:stop].T @ rows[:, start:]).to(torch.float64)
        self.token_count += rows.shape[0]

    def packed(self) -> torch.Tensor:
        return torch.cat([pack_band(band) for band in self.bands]).cpu()

    def release(self) -> torch.Tensor:
        """The packed triangle, each band freed as soon as it is packed: packing Grams one by one holds one Gram's
        bands and its packed triangle at a time, not all of both."""
        packed = torch.empty(self.dim * (self.dim + 1) // 2, dtype=torch.float64)
        begin = 0
        while self.bands:
            piece = pack_band(self.bands.pop(0))
            packed[begin:begin + piece.numel()] = piece.cpu()
            begin += piece.numel()
        return packed


def _real_rows(inputs: torch.Tensor, masks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """The rows of a layer input that belong to real tokens, and whether pads are surely excluded.

    Token-shaped inputs whose leading dimensions match a mask are masked by it (a seq2seq model has two: the
    encoder's and the decoder's, of different lengths, so a layer's input matches its own side's); per-example
    inputs (a classifier's pooled vector) hold no pads; any other shape is taken whole and flagged.
    """
    features = inputs.shape[-1]
    for mask in masks:
        if inputs.dim() >= 2 and tuple(inputs.shape[:-1]) == tuple(mask.shape):
            return inputs[mask], True
    return inputs.reshape(-1, features), inputs.dim() == 2


class GramCollector:
    """Hooks a model's linear layers and accumulates their input Grams, sharing Grams between layers fed one tensor.

    Use as a context manager; call :meth:`set_mask` with each batch's attention mask(s) before the forward pass.
    Which layers share an input is learnt on the first batch, by tensor identity, and checked on every later batch.
    """

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype = torch.float64,
                 only: set[str] | None = None, clip: float | None = None) -> None:
        self.model = model
        self.clip = clip  # per-example clipping for differential privacy (fusion.privacy), in the statistics only
        self.clipped: dict[str, int] = {}  # gram key -> examples scaled down
        self.compute_dtype = compute_dtype
        self.modules = [m for m in linear_modules(model) if only is None or m[0] in only]
        self.kind = {name: kind for name, _, kind in self.modules}
        self.aliases = tied_aliases(model)  # a tied LM head's weight is known by the embeddings' name
        self.gram_key: dict[str, str] = {}  # module -> the module whose Gram it uses (its first reader)
        self.accumulators: dict[str, GramAccumulator] = {}
        self.pads_excluded: dict[str, bool] = {}
        self.example_count = 0
        self._masks: list[torch.Tensor] = []
        self._batch_examples = 0
        self._batch_inputs: dict[str, torch.Tensor] = {}  # gram key -> this batch's input, kept for identity checks
        self._handles: list[Any] = []
        self._learnt = False

    def __enter__(self) -> GramCollector:
        for name, module, _ in self.modules:
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._batch_inputs.clear()

    def set_mask(self, mask: torch.Tensor | Sequence[torch.Tensor] | None, example_count: int) -> None:
        """Start a batch: its attention mask (batch x tokens, 1 = real; a seq2seq batch has the encoder's and the
        decoder's) and how many examples it holds."""
        if self._batch_inputs:
            self._learnt = True
        self._batch_inputs.clear()
        masks = [] if mask is None else [mask] if isinstance(mask, torch.Tensor) else list(mask)
        self._masks = [m.bool() for m in masks]
        self.example_count += example_count
        self._batch_examples = example_count

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs = args[0] if args else next(iter(kwargs.values()))
            self._observe(name, inputs)

        return hook

    def _observe(self, name: str, inputs: torch.Tensor) -> None:
        key = self.gram_key.get(name)
        if key is None:
            if self._learnt:
                raise RuntimeError(f"layer {name!r} was not reached by the first batch but is by a later one")
            key = next((k for k, seen in self._batch_inputs.items() if seen is inputs), name)
            self.gram_key[name] = key
        if key != name:
            if self._batch_inputs.get(key) is not inputs:
                raise RuntimeError(
                    f"layer {name!r} shared its input with {key!r} on the first batch but not on this one; "
                    "a model whose layers share inputs only sometimes is not supported"
                )
            return
        if self.clip is not None and key in self._batch_inputs:
            # A layer run twice per pass (ALBERT's shared blocks) adds each example's rows twice: its share of the
            # Gram is then up to twice the clip, and the noise calibrated to one clip would not cover it.
            raise PrivacyError(f"layer {name!r} runs more than once per forward pass (shared weights); clipping "
                               "bounds one pass per example, so differentially private statistics of this model "
                               "are not supported")
        self._batch_inputs[key] = inputs
        if self.clip is None:
            rows, pads_excluded = _real_rows(inputs.detach(), self._masks)
        else:
            rows, clipped, pads_excluded = clipped_rows(inputs.detach(), self._masks, self._batch_examples,
                                                        self.clip, key)
            self.clipped[key] = self.clipped.get(key, 0) + clipped
        accumulator = self.accumulators.get(key)
        if accumulator is None:
            accumulator = self.accumulators[key] = GramAccumulator(rows.shape[-1], self._dtype_for(rows), device=rows.device)
        accumulator.add(rows)
        self.pads_excluded[key] = pads_excluded

    def _dtype_for(self, rows: torch.Tensor) -> torch.dtype:
        # Half-precision products overflow; float64 models keep float64 products.
        return torch.float64 if rows.dtype == torch.float64 else self.compute_dtype

    def _gram_dtype_name(self) -> str:
        exact = all(acc.compute_dtype == torch.float64 for acc in self.accumulators.values())
        return "float64" if exact else "float32"

    def statistics(self, settings: Mapping[str, Any] | None = None, fingerprint: str | None = None) -> GramStatistics:
        """The accumulated statistics, with ``fingerprint`` (default: that of the model's current weights). Call it
        once: it packs and frees the accumulators as it goes."""
        modules = {
            name: ModuleInfo(gram=self.gram_key[name], kind=self.kind[name],
                             weight=self.aliases.get(f"{name}.weight", f"{name}.weight"))
            for name, _, _ in self.modules
            if name in self.gram_key
        }
        grams = {key: acc.release() for key, acc in self.accumulators.items()}
        return GramStatistics(
            grams=grams,
            dims={key: acc.dim for key, acc in self.accumulators.items()},
            token_counts={key: acc.token_count for key, acc in self.accumulators.items()},
            pads_excluded=dict(self.pads_excluded),
            modules=modules,
            example_count=self.example_count,
            fingerprint=fingerprint or weights_fingerprint(self.model.state_dict()),
            settings=dict(settings or {}),
            gram_dtype=self._gram_dtype_name(),
        )


def _split_batch(batch: Any, device: torch.device) -> tuple[tuple, dict, list[torch.Tensor] | None, int]:
    if isinstance(batch, Mapping):
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        mask = [inputs[key] for key in ("attention_mask", "decoder_attention_mask") if key in inputs]
        first = next(iter(inputs.values()))
        return (), inputs, mask, int(first.shape[0])
    if isinstance(batch, torch.Tensor):
        return (batch.to(device),), {}, None, int(batch.shape[0])
    raise TypeError(f"a batch is a mapping of model inputs or a tensor, not {type(batch).__name__}")


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    compute_dtype: torch.dtype = torch.float64,
    settings: Mapping[str, Any] | None = None,
    progress: Any = None,
    fingerprint: str | None = None,
    only: set[str] | None = None,
    privacy: PrivacySpec | None = None,
    draw_noise: bool = True,
) -> GramStatistics:
    """Gram statistics of ``model`` over ``batches``.

    A batch is a mapping of keyword inputs (a Hugging Face tokenizer's output; ``attention_mask`` masks pads,
    ``labels`` is ignored) or a single input tensor. ``compute_dtype`` is that of the per-batch products: float64
    (exact, the default) or float32 (about twice as fast, ~1e-7 relative error). ``progress`` is an optional tqdm-like object updated per example.
    ``fingerprint`` names the weights when the caller knows it (a folder's), saving a hash of the whole model.
    ``only``: hook these layers alone (an adapter's: the others are the base's, the same for every owner).
    ``privacy``: clip each example's rows and noise the Grams (:mod:`fusion.privacy`); the release is recorded in
    the statistics' ``privacy`` and the request in their settings. ``draw_noise=False`` stops after clipping (noise
    standard deviation 0): what a trusted curator holds, from which experiments draw many noises (:func:`privatise`).
    Memory stays at one model plus one set of Grams, whatever the number of batches.
    """
    device = next(model.parameters()).device  # batches go where the model is: the GPU, when it was put there
    was_training = model.training
    model.eval()
    try:
        clip = privacy.clip if privacy is not None else None
        with torch.no_grad(), GramCollector(model, compute_dtype, only, clip) as collector:
            for batch in batches:
                args, kwargs, mask, size = _split_batch(batch, device)
                collector.set_mask(mask, size)
                model(*args, **kwargs)
                if progress is not None:
                    progress.update(size)
    finally:
        model.train(was_training)
    if collector.example_count == 0:
        raise ValueError("no batches: statistics need at least one example")
    stats = collector.statistics(settings, fingerprint)
    if privacy is not None:
        # The token layers of one stack see the same lengths, so the largest count is the examples clipped anywhere
        # (a lower bound for an encoder-decoder, whose decoder lengths differ).
        stats.clipped_examples = max(collector.clipped.values(), default=0)  # stays at the site: not in the file
        # A Gram's token count would tell how long the examples are: under DP each counts its examples only.
        stats.token_counts = {key: stats.example_count for key in stats.token_counts}
        stats.privacy = clipped_record(privacy.clip)
        stats.settings["privacy"] = privacy.clipping()  # the noise's request replaces it when noise is drawn
        if draw_noise:
            privatise(stats, privacy)
    return stats

