"""RegMean++ (Nguyen et al., TMLR 2026): RegMean whose Grams describe the inputs the merged model will really see.

A model is a sequence of *units* in forward order (:func:`forward_units`): the embeddings, each transformer block,
then each remaining top-level module (for seq2seq the encoder's blocks, then the decoder's). Unit by unit, every
owner runs its own data through the already merged units before it and through its own unit, whose linear layers'
input Grams are gathered; RegMean merges the unit from those Grams (units without linear layers are count-weighted
averages, as RegMean merges them), and the merged unit then feeds the next.

Each owner's pass runs the model's own forward, with the merged prefix loaded, and stops once the unit has run, so
that masks, position embeddings, position biases (T5 hands them from block to block) and pooled tokens reach the
unit exactly as the model threads them, with no knowledge of the architecture here. What makes it cheap: the blocks
of a list that are already merged do not run again. Once block j is merged, its output on each of the owner's
batches is recorded, and from then on blocks 0..j of that list return the recording (:class:`Replay`); the model's
loop hands it on as it would the real output. So each unit costs one pass through itself (plus the cheap modules
around the lists) per owner for its Grams and one for the merged block's output: about twice a statistics pass in
all, rather than growing with the square of the depth. The recordings (one block output per batch per owner) are
kept on the CPU.

The pass yields ordinary statistics, one file's worth per owner: merging the owners by RegMean with them *is* the
RegMean++ merge, so the streamed merge, its report and its outputs are RegMean's. Every owner's Grams depend on every
other owner (through the merged prefix): RegMean++ has no sums that an owner could join or leave.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .errors import MergeError
from .gram import GramCollector, _split_batch, linear_modules
from .methods import MergeContext, MergeMethod, OwnerState
from .statistics import GramStatistics

log = logging.getLogger("gramfuse")


@dataclass
class PassOwner:
    """An owner in the RegMean++ pass: its checkpoint's tensors by stored name (read lazily), its data as batches."""

    name: str
    files: Mapping[str, torch.Tensor]
    batches: Sequence[Any]
    fingerprint: str


@dataclass
class Unit:
    name: str
    module: nn.Module
    params: dict[str, str]  # the working model's parameter name -> its name in the owners' checkpoints
    layers: list[str]  # the linear layers inside, by module name
    stack: str = ""  # the list of blocks it is one of ("" for any other unit)
    index: int = -1  # its place in that list

    @property
    def stored(self) -> list[str]:
        return list(self.params.values())


class _UnitDone(Exception):
    """Raised by a hook once the unit being measured has run: nothing after it matters."""


def untie(model: nn.Module) -> dict[str, str]:
    """Give every tied parameter (an LM head tied to the input embeddings) a tensor of its own, so that a unit can
    hold an owner's value while the units before it hold the merge; returns each second name -> its stored name."""
    first: dict[int, str] = {}
    aliases = {}
    for module_name, module in list(model.named_modules(remove_duplicate=False)):
        for name, param in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            if id(param) in first and first[id(param)] != full:
                aliases[full] = first[id(param)]
                setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=False))
            else:
                first.setdefault(id(param), full)
    return aliases


def _has_blocks(module: nn.Module) -> bool:
    return any(isinstance(m, nn.ModuleList) and linear_modules(m) for m in module.modules())


def unit_candidates(model: nn.Module) -> list[tuple[str, nn.Module, str, int]]:
    """The model cut into units ``(name, module, stack, index)``: the outermost lists of blocks give one unit per
    block (``stack`` the list's name, ``index`` its place); modules above a list are opened; every other module that
    holds parameters is one unit."""
    found: list[tuple[str, nn.Module, str, int]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, nn.ModuleList) and linear_modules(child):
                found.extend((f"{full}.{index}", block, full, index) for index, block in enumerate(child))
            elif _has_blocks(child):
                visit(full + ".", child)
            elif any(True for _ in child.parameters()):
                found.append((full, child, "", -1))

    visit("", model)
    unique, seen = [], set()
    for candidate in found:  # T5's encoder and decoder reach the shared embeddings under their own names
        if id(candidate[1]) not in seen:
            seen.add(id(candidate[1]))
            unique.append(candidate)
    return unique


def forward_units(model: nn.Module, batch: Any, aliases: Mapping[str, str]) -> list[Unit]:
    """The units with linear layers in the order one forward pass of ``batch`` first calls them, after every unit
    without (averaged: their merge needs no Grams, so it comes first, and a unit used without being called, as
    DeBERTa's relative embeddings, or called at several depths, is merged before anything reads it). A unit with
    linear layers the pass never calls is averaged with them (no Grams reach it). One that runs twice in one pass
    (weights shared across depth, as ALBERT's) has no place in the order: an error. A list of blocks is replayed
    (:class:`Replay`) only where the pass shows it is a chain: its blocks called once each, in order, back to back,
    each fed the one before's output; any other list (XLM's attentions and feed-forwards, called in turn) runs."""
    candidates = unit_candidates(model)
    calls: dict[int, int] = {}
    sequence: list[int] = []
    fed: dict[int, Any] = {}  # each block's first input and its output, to check that the list is a chain
    made: dict[int, Any] = {}

    def before(index: int):
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            calls[index] = calls.get(index, 0) + 1
            sequence.append(index)
            fed.setdefault(index, args[0] if args else next(iter(kwargs.values()), None))
        return hook

    def after(index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            made.setdefault(index, output)
        return hook

    handles = []
    for index, candidate in enumerate(candidates):
        handles.append(candidate[1].register_forward_pre_hook(before(index), with_kwargs=True))
        handles.append(candidate[1].register_forward_hook(after(index)))
    try:
        args, kwargs, _, _ = _split_batch(batch, next(model.parameters()).device)
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    chains = _chains(candidates, sequence, fed, made)
    names = dict(model.named_parameters())
    first_call = {index: sequence.index(index) for index in calls}
    averaged, solved = [], []
    for index in sorted(range(len(candidates)), key=lambda i: first_call.get(i, len(sequence))):
        name, module, stack, place = candidates[index]
        layers = [f"{name}.{layer}" if layer else name for layer, _, _ in linear_modules(module)]
        if layers and calls.get(index, 0) > 1:
            raise MergeError(f"regmean++: {name!r} runs {calls[index]} times in one forward pass (its weights serve "
                             "several depths); such a model has no order of units to merge in")
        params = {f"{name}.{p}": aliases.get(f"{name}.{p}", f"{name}.{p}") for p, _ in module.named_parameters()}
        params = {p: stored for p, stored in params.items() if p in names}
        if layers and index in calls:
            solved.append(Unit(name, module, params, layers, stack if stack in chains else "", place))
        else:
            averaged.append(Unit(name, module, params, []))
    return averaged + solved


def _chains(candidates: Sequence[tuple], sequence: list[int], fed: Mapping[int, Any],
            made: Mapping[int, Any]) -> set[str]:
    """The lists of blocks the pass ran as a chain: block k called right after block k-1 among the units, once,
    on block k-1's output (itself, or the first item of the tuple it returned)."""
    by_stack: dict[str, list[int]] = {}
    for index, (_, _, stack, _) in enumerate(candidates):
        if stack:
            by_stack.setdefault(stack, []).append(index)
    chains = set()
    for stack, blocks in by_stack.items():
        calls = [index for index in sequence if index in blocks]
        start = sequence.index(blocks[0]) if blocks[0] in sequence else -1
        if calls != blocks or sequence[start:start + len(blocks)] != blocks:
            continue
        if all(_output_tensor(made.get(previous)) is fed.get(block) for previous, block in zip(blocks, blocks[1:])):
            chains.add(stack)
    return chains


def _output_tensor(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) and output else output


def loose_parameters(model: nn.Module, units: Sequence[Unit], aliases: Mapping[str, str]) -> Unit | None:
    """Parameters held directly by a module that was opened (no unit's): averaged before any unit runs."""
    inside = {name for unit in units for name in unit.params}
    loose = {name: aliases.get(name, name) for name, _ in model.named_parameters() if name not in inside}
    return Unit("(loose parameters)", model, loose, []) if loose else None


def load_unit(model: nn.Module, unit: Unit, values: Mapping[str, torch.Tensor]) -> None:
    """Put ``values`` (by stored name) into the unit's parameters, in the model's dtype; a head of another label set
    may change its shape."""
    params = dict(model.named_parameters())
    for name, stored in unit.params.items():
        if stored not in values:
            continue
        param = params[name]
        param.data = values[stored].detach().to(param.device, param.dtype).clone()


def _copied(value: Any, device: torch.device | str) -> Any:
    """A block's output with every tensor copied to ``device`` (tuples, lists, dicts and None kept as they are)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_copied(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _copied(item, device) for key, item in value.items()}
    return value


class Replay:
    """Per list of blocks, the merged output of its last merged block on each owner's batches. While active for an
    owner, blocks 0..j of each list skip their work and return (a copy of) block j's recorded output for the
    current batch: the model's loop hands it on as the real one."""

    def __init__(self, stacks: Mapping[str, nn.ModuleList]) -> None:
        self.stacks = stacks
        self.recorded: dict[str, tuple[int, dict[str, list[Any]]]] = {}  # stack -> (j, owner -> outputs by batch)
        self.batch = 0

    def record(self, unit: Unit, outputs: dict[str, list[Any]]) -> None:
        self.recorded[unit.stack] = (unit.index, outputs)

    @contextlib.contextmanager
    def active(self, owner: str, device: torch.device):
        replaced = []
        for stack, (last, outputs) in self.recorded.items():
            blocks = list(self.stacks[stack])[: last + 1]
            shared: dict[int, Any] = {}  # one copy per batch for the blocks whose output the next one ignores
            for place, block in enumerate(blocks):
                block.forward = self._recorded(outputs[owner], device, shared, fresh=place == last)
                replaced.append(block)
        try:
            yield
        finally:
            for block in replaced:
                del block.forward

    def _recorded(self, outputs: list[Any], device: torch.device, shared: dict[int, Any], fresh: bool):
        """Block j hands on a fresh copy of its recording (the model may change it in place); the blocks before it
        are replayed too, but their outputs feed only replayed blocks, so they share one copy per batch."""

        def forward(*args: Any, **kwargs: Any) -> Any:
            if fresh:
                return _copied(outputs[self.batch], device)
            if self.batch not in shared:
                shared.clear()
                shared[self.batch] = _copied(outputs[self.batch], device)
            return shared[self.batch]

        return forward


def run_to_unit(model: nn.Module, unit: Unit, owner: PassOwner, replay: Replay, each=None, collector=None) -> None:
    """Run the owner's batches through the model up to and including ``unit`` (the merged blocks replayed);
    ``each(output)`` sees the unit's output on every batch; ``collector`` gathers Grams."""

    def stop(module: nn.Module, args: Any, output: Any) -> None:
        if each is not None:
            each(output)
        raise _UnitDone

    device = next(model.parameters()).device
    handle = unit.module.register_forward_hook(stop)
    try:
        with torch.no_grad(), replay.active(owner.name, device):
            for number, batch in enumerate(owner.batches):
                replay.batch = number
                args, kwargs, mask, size = _split_batch(batch, device)
                if collector is not None:
                    collector.set_mask(mask, size)
                try:
                    model(*args, **kwargs)
                except _UnitDone:
                    pass
    finally:
        handle.remove()


def unit_statistics(model: nn.Module, unit: Unit, owner: PassOwner, replay: Replay,
                    settings: Mapping[str, Any]) -> GramStatistics:
    """The Grams of the unit's linear layers over the owner's data, on the merged prefix's outputs."""
    with GramCollector(model, only=set(unit.layers)) as collector:
        run_to_unit(model, unit, owner, replay, collector=collector)
    stats = collector.statistics(settings, owner.fingerprint)
    stats.modules = {layer: replace(info, weight=unit.params.get(info.weight, info.weight))
                     for layer, info in stats.modules.items()}
    return stats


def merged_outputs(model: nn.Module, unit: Unit, owner: PassOwner, replay: Replay) -> list[Any]:
    """The merged unit's output on each of the owner's batches, on the CPU."""
    outputs: list[Any] = []
    run_to_unit(model, unit, owner, replay, each=lambda output: outputs.append(_copied(output, "cpu")))
    return outputs


def empty_statistics(example_count: int, fingerprint: str, settings: Mapping[str, Any]) -> GramStatistics:
    return GramStatistics({}, {}, {}, {}, {}, example_count, fingerprint, dict(settings))


def joined(parts: Sequence[GramStatistics], example_count: int, fingerprint: str,
           settings: Mapping[str, Any]) -> GramStatistics:
    """One owner's statistics of all units as one file's worth."""
    stats = empty_statistics(example_count, fingerprint, settings)
    for part in parts:
        for field_name in ("grams", "dims", "token_counts", "pads_excluded", "modules"):
            getattr(stats, field_name).update(getattr(part, field_name))
        if part.gram_dtype == "float32":
            stats.gram_dtype = "float32"
    return stats


def plusplus_statistics(
    model: nn.Module,
    owners: Sequence[PassOwner],
    method: MergeMethod,
    context: Callable[[Mapping[str, Any]], MergeContext],
    *,
    head: set[str] = frozenset(),
    settings: Mapping[str, Any] | None = None,
    progress: Any = None,
) -> dict[str, GramStatistics]:
    """Each owner's RegMean++ statistics, gathered unit by unit on ``model`` (any owner's model, on the device the
    pass runs on; it is changed). ``method`` merges each unit once every owner's Grams of it are in; ``context``
    gives its context from the unit's layers. ``head``: the stored names of heads the owners do not share, never
    merged here (nothing runs after a head). Returns the statistics by owner name."""
    from .merge import merge_states

    settings = {**(settings or {}), "regmean++": True}
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a KV cache would be filled only by the blocks that run, and is not needed
    aliases = untie(model)
    units = forward_units(model, owners[0].batches[0], aliases)
    loose = loose_parameters(model, units, aliases)
    units = ([loose] if loose else []) + units
    log.info("regmean++: %d units, %d with linear layers; lists replayed: %s", len(units),
             sum(bool(unit.layers) for unit in units), ", ".join(sorted({u.stack for u in units if u.stack})) or "none")
    counts = {owner.name: sum(_split_batch(b, "cpu")[3] for b in owner.batches) for owner in owners}
    parts: dict[str, list[GramStatistics]] = {owner.name: [] for owner in owners}
    modules = dict(model.named_modules())
    replay = Replay({unit.stack: modules[unit.stack] for unit in units if unit.stack})
    if progress is not None:
        progress.reset(total=len(units))
    for number, unit in enumerate(units, start=1):
        states = []
        for owner in owners:
            if unit.layers:
                load_unit(model, unit, owner.files)
                stats = unit_statistics(model, unit, owner, replay, settings)
            else:
                stats = empty_statistics(counts[owner.name], owner.fingerprint, settings)
            parts[owner.name].append(stats)
            states.append(OwnerState(owner.name, {n: owner.files[n] for n in unit.stored}, stats))
        if not set(unit.stored) & set(head):
            layers = {layer: info for state in states for layer, info in state.statistics.modules.items()}
            load_unit(model, unit, merge_states(states, method, context(layers)).params)
            if unit.stack:
                replay.record(unit, {owner.name: merged_outputs(model, unit, owner, replay) for owner in owners})
        log.info("regmean++: unit %d/%d %s merged (%d linear layers)", number, len(units), unit.name, len(unit.layers))
        if progress is not None:
            progress.update(1)
    return {owner.name: joined(parts[owner.name], counts[owner.name], owner.fingerprint, settings)
            for owner in owners}
