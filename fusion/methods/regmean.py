"""RegMean (Jin et al., ICLR 2023): per linear layer, the weights that best reproduce every owner's layer on that
owner's inputs, ``W^T = (sum_i G_i)^-1 sum_i G_i W_i^T``; everything else averaged.

Owners contribute ``G_i`` (once per shared input), ``G_i W_i^T`` and ``diag(G_i) W_i^T`` per layer, so that the
non-diagonal reduction ``G' = alpha G + (1 - alpha) diag(G)`` can be chosen after aggregation: both ``sum G'_i`` and
``sum G'_i W_i^T`` are linear in those three sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import MergeError
from ..gram import CONV1D
from ..statistics import unpack_upper
from ..privacy import PrivacyError, noise_ridge, spectral_norm
from ..solve import GRAM_PRECISION, NOISY_SOLVER, solve_gram
from . import MergeContext, MergeMethod, MergeOutcome, OwnerState, register, weighted, weighted_means
from ._relative import depth_scalings

GRAM = "gram/"
GRAM_WEIGHT = "gram-weight/"  # G_i W_i^T per layer
DIAG_WEIGHT = "diag-weight/"  # diag(G_i) W_i^T per layer
COVERED = "covered/"  # how many owners had statistics for the layer
OWNERS = "owners"
# Differentially private statistics (fusion.privacy): how many owners' are, and the summed noise variance per Gram
# entry. Sums like the rest, so every mode (offline, plaintext, secure) knows the noise it solves under.
PRIVATE = "private-owners"
NOISE_VARIANCE = "noise-variance/"


def transposed(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """``W^T`` (in x out) whatever the layer stores: nn.Linear keeps out x in, Conv1D in x out."""
    return weight if kind == CONV1D else weight.T


def needs_diagonal(methods) -> bool:
    """Whether the sums must hold ``diag(G) W^T``: only a RegMean with alpha < 1 reads it, and owners' sums of
    it are as large as their weights, so a federation or a merge that asks for none leaves it out."""
    return any(isinstance(method, RegMean) and method.alpha < 1.0 for method in methods)


@register("regmean")
@dataclass
class RegMean(MergeMethod):
    alpha: float = 1.0  # 1: plain RegMean; 0: diagonal-weighted average. The paper tuned it per setting.
    # "sum": pooled least squares, count-weighted averages (the paper's equation); "equal": each owner's Gram over its
    # real tokens, as the authors' code averages (theirs over pads too), every owner weighing the same.
    weighting: str = "sum"
    # A tensor used twice (input embeddings tied to the LM head) is merged once: "head" solves it as the head's
    # weight, from the head's Grams; "embedding" averages it as an embedding. Measured on the LLM job (README).
    tied: str = "head"
    # LiNeS (Wang et al., ICLR 2025) on RegMean's own task vector, merged minus base: block l of L keeps
    # lines_alpha + lines_beta (l - 1) / (L - 1) of it, parameters outside the blocks lines_alpha. 1 and 0: off.
    lines_alpha: float = 1.0
    lines_beta: float = 0.0

    needs_statistics = True
    # Owners send G, G W^T and diag(G) W^T whatever alpha, the tie rule and LiNeS: all are chosen afterwards.
    combine_only = ("alpha", "tied", "lines_alpha", "lines_beta")

    @property
    def needs_base(self) -> bool:  # only LiNeS reads the base (the other methods' is a class attribute)
        return self.lines_alpha != 1.0 or self.lines_beta != 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], not {self.alpha}")
        if self.weighting not in ("sum", "equal"):
            raise ValueError(f"weighting must be 'sum' or 'equal', not {self.weighting!r}")
        if self.tied not in ("head", "embedding"):
            raise ValueError(f"tied must be 'head' or 'embedding', not {self.tied!r}")
        if not all(math.isfinite(value) for value in (self.lines_alpha, self.lines_beta)):
            raise ValueError(f"lines_alpha and lines_beta must be finite, not {self.lines_alpha}, {self.lines_beta}")

    def solves(self, module: str, info) -> bool:
        """Whether a hooked layer is solved from its Grams (a tied one only under the ``head`` rule)."""
        return self.tied == "head" or not info.tied_to(module)

    noisable = True

    def noise_units(self, key: str, weight_bound: float) -> float | None:
        if key.startswith(GRAM):
            return 1.0
        return weight_bound if key.startswith((GRAM_WEIGHT, DIAG_WEIGHT)) else None

    def _check_noisable(self, owner: OwnerState, noise) -> None:
        stats = owner.statistics
        if self.weighting != "sum":
            # Each owner's Gram over its own count: the sensitivity would differ by site, and no share would fit all.
            raise PrivacyError(f"regmean weighting={self.weighting!r} cannot take distributed DP noise; use 'sum'")
        record = stats.privacy or {}
        if record.get("noise_std") != 0.0 or record.get("clip") != noise.clip:
            raise PrivacyError(f"owner {owner.name!r}: distributed DP noise needs statistics clipped to {noise.clip} "
                               f"token(s) and not yet noised (these: clip {record.get('clip')}, noise std "
                               f"{record.get('noise_std')})")

    def _noised(self, key: str, value: torch.Tensor, units: float, context: MergeContext) -> torch.Tensor:
        noise = context.noise
        return value + noise.noise(key, tuple(value.shape), noise.std(units)).to(value.device)

    def contribute(self, owner: OwnerState, context: MergeContext):
        stats = owner.statistics
        noise = context.noise
        if noise is not None:
            self._check_noisable(owner, noise)
        weight = owner.example_count if self.weighting == "sum" else 1.0
        contribution = weighted(owner.params, weight)  # averaged tensors, and the fallback of every layer
        contribution[OWNERS] = torch.tensor(1.0, dtype=torch.float64)
        contribution[PRIVATE] = torch.tensor(1.0 if stats.privacy else 0.0, dtype=torch.float64)
        for key, modules in stats.modules_by_gram().items():
            hooked = [m for m in modules if stats.modules[m].weight in owner.params]
            if not hooked:
                continue
            tokens = stats.token_counts[key]
            packed = stats.grams[key].to(context.device)  # read once: a statistics file may give it lazily
            if self.weighting == "equal":
                packed = packed / max(tokens, 1)
            gram = unpack_upper(packed, stats.dims[key])  # the clipped Gram: products are noised on their own
            contribution[GRAM + key] = packed
            if noise is not None:
                contribution[GRAM + key] = self._noised(GRAM + key, packed, 1.0, context)
                contribution[NOISE_VARIANCE + key] = torch.tensor(noise.std(1.0) ** 2, dtype=torch.float64)
            elif stats.noise_std > 0.0:
                scale = 1.0 / max(tokens, 1) if self.weighting == "equal" else 1.0
                contribution[NOISE_VARIANCE + key] = torch.tensor((stats.noise_std * scale) ** 2, dtype=torch.float64)
            diagonal = gram.diagonal().unsqueeze(1)
            for module in hooked:
                info = stats.modules[module]
                weight_t = transposed(owner.params[info.weight], info.kind).to(context.device, torch.float64)
                contribution[GRAM_WEIGHT + module] = gram @ weight_t
                if context.diagonal:
                    contribution[DIAG_WEIGHT + module] = diagonal * weight_t
                if noise is not None:
                    self._noise_products(owner, module, weight_t, contribution, context)
                contribution[COVERED + module] = torch.tensor(1.0, dtype=torch.float64)
        return contribution

    def _noise_products(self, owner: OwnerState, module: str, weight_t: torch.Tensor, contribution: dict,
                        context: MergeContext) -> None:
        """``G W^T`` (and ``diag(G) W^T``) move with one example by at most ``sqrt(2) clip ||W||_2``: noised to the
        public bound, which a layer above it would break."""
        bound = context.noise.weight_bound
        norm = spectral_norm(weight_t)
        if norm > bound:
            reason = f"layer {module!r}: its weights' spectral norm is above dp-weight-bound {bound:g}"
            raise PrivacyError(f"owner {owner.name!r}, {reason} ({norm:.4g}): the noise on G W^T would be too "
                               "small for it; raise dp-weight-bound (every site's noise grows with it)",
                               public=reason)
        for prefix in (GRAM_WEIGHT, DIAG_WEIGHT):
            if prefix + module in contribution:
                contribution[prefix + module] = self._noised(prefix + module, contribution[prefix + module], bound,
                                                             context)

    def combine(self, sums, context: MergeContext) -> MergeOutcome:
        merged = weighted_means(sums)
        outcome = MergeOutcome(merged)
        owners = float(sums[OWNERS])
        private = float(sums.get(PRIVATE, 0.0))
        if 0.0 < private < owners:
            raise MergeError(f"{private:.0f} of {owners:.0f} owners' statistics are differentially private and the "
                             "others' are not: their Grams are on different scales (unit-norm rows against raw "
                             "ones); give every owner DP statistics (gramfuse stats --dp-epsilon) or none")
        groups: dict[str, list[str]] = {}
        for module, info in context.modules.items():
            if info.weight not in merged or not self.solves(module, info):
                continue  # a layer not merged here (an owner's own head), or a tied one averaged as an embedding
            if float(sums.get(COVERED + module, 0.0)) < owners:
                outcome.warnings.append(
                    f"layer {module!r}: statistics missing for some owners; averaged instead of RegMean"
                )
                continue
            groups.setdefault(info.gram, []).append(module)
        for key, modules in groups.items():
            self._solve_group(key, modules, sums, context, outcome)
        if self.needs_base:
            self._scale_by_depth(outcome.params, context)
        return outcome

    def _scale_by_depth(self, params: dict, context: MergeContext) -> None:
        """LiNeS on the task vector of every parameter the base has (a head it lacks stays as merged)."""
        if context.base is None:
            raise MergeError("regmean with lines_alpha/lines_beta scales its task vector (merged minus base): give "
                             "the base model (--base; base-path in the federation)")
        # A group's sums hold a few blocks: the depth of each stack comes from the whole model (the base's names).
        scalings = depth_scalings(context.base, self.lines_alpha, self.lines_beta)
        for name, value in params.items():
            reference = context.base.get(name)
            if reference is not None and reference.shape == value.shape:
                base = reference.to(value.device, torch.float64)
                params[name] = (base + scalings[name] * (value.double() - base)).to(value.dtype)

    def _solve_group(self, key, modules, sums, context: MergeContext, outcome: MergeOutcome) -> None:
        """One factorisation of the shared Gram serves every layer fed that input."""
        infos = [context.modules[m] for m in modules]
        gram = sums[GRAM + key]
        prior = torch.cat([transposed(outcome.params[i.weight], i.kind) for i in infos], dim=1).to(gram.device)
        gram = unpack_upper(gram, prior.shape[0])
        rhs = torch.cat([sums[GRAM_WEIGHT + m] for m in modules], dim=1)
        if self.alpha < 1.0:
            gram = self.alpha * gram + (1.0 - self.alpha) * torch.diag(gram.diagonal())
            if any(DIAG_WEIGHT + m not in sums for m in modules):
                raise MergeError(f"regmean alpha={self.alpha}: the sums hold no diag(G) W^T for layer {key!r} "
                                 "(aggregated for alpha = 1 only)")
            diag_rhs = torch.cat([sums[DIAG_WEIGHT + m] for m in modules], dim=1)
            rhs = self.alpha * rhs + (1.0 - self.alpha) * diag_rhs
        noise_variance = float(sums.get(NOISE_VARIANCE + key, 0.0))
        ridge = noise_ridge(noise_variance, prior.shape[0])
        solution, report = solve_gram(gram, rhs, prior, GRAM_PRECISION[context.gram_dtype], ridge)
        widths = [sums[GRAM_WEIGHT + m].shape[1] for m in modules]
        for info, part in zip(infos, torch.split(solution, widths, dim=1)):
            outcome.params[info.weight] = transposed(part, info.kind).contiguous().cpu()
        outcome.layers[key] = {"modules": modules, **report.as_dict()}
        if noise_variance > 0.0:
            outcome.layers[key]["noise_std"] = noise_variance ** 0.5
        if report.solver not in ("cholesky", NOISY_SOLVER):
            outcome.warnings.append(
                f"layer {key!r}: summed Gram is ill-conditioned (condition {report.condition:.3g}); "
                f"solved by {report.solver}, regularised towards the average"
            )
