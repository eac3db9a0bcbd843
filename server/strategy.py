"""The aggregation server's Flower strategy: the exchanges in which the sites send their weights and statistics.

Lifecycle, as Flower's strategies: ``configure_train`` asks each connected node for what the method needs;
``aggregate_train`` folds each reply into running sums *as it arrives* (:meth:`RegMeanStrategy._exchange` pulls
replies one at a time), so the server holds one reply plus the sums whatever the number of owners. The strategy
forms the sums a part of the model at a time (:meth:`RegMeanStrategy.sums_parts`); ``server/app.py`` runs the steps
and writes each part with ``fusion``'s one finish, exactly what ``gramfuse merge`` writes, plus ``report.json``.

An owner whose reply is an error, never comes, or does not fit the others (architecture, label set, statistics) is
named by node id in the log and the report, and left out; the merge goes on while ``min_owners`` still hold, and
fails with a clear message, writing nothing, below that.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from federation.audit import record_reply
from federation.memory import peak_rss_mb
from federation.payload import Part, config_from, dtype_from, labels_from, owner_from_payload
from federation.wire import META, PAYLOAD, TOKENIZER

from fusion.aggregate import Aggregator
from fusion.checkpoint import check_apart, check_same_shapes, tokenizer_from_files
from fusion.errors import CompatibilityError, GramfuseError
from fusion.finish import Finisher, Group, Output, SumsOf, plan_groups, plan_outputs
from fusion.lazy import CheckpointFiles
from fusion.merge import check_layout, load_base
from fusion.methods import MergeContext, MergeMethod
from fusion.methods.regmean import needs_diagonal
from fusion.statistics import ModuleInfo, packed_diagonal
from fusion.distance import OwnerDistances
from server.plausibility import (DOMINANT_SHARE, influence, matches, near_one_owner, outliers, per_token_traces,
                                 privacy_misfits, private_trace_misfits)
from server.state import StateKeeper

log = logging.getLogger("gramfuse.server")
REPORT_FILE = "report.json"
POLL_SECONDS = 0.5
DEFAULT_PART_BYTES = 2 * 1024**3  # server-side sums per part of the model asked for at once
PROGRESS_SECONDS = 30.0  # how often a step that waits on the sites logs how many have answered


def partition(groups: list[Group], layout: dict, part_bytes: int | None = None) -> list[list[Group]]:
    """Consecutive groups in parts whose server-side float64 sums stay under ``part_bytes`` (a group larger than
    that is a part of its own): the weights' sums, ``G W^T`` and a margin per layer, and the Gram unpacked."""
    part_bytes = DEFAULT_PART_BYTES if part_bytes is None else part_bytes
    dims = {key: int(info["dim"]) for key, info in layout.get("statistics", {}).get("grams", {}).items()}
    parts: list[list[Group]] = [[]]
    used = 0
    for group in groups:
        size = 8 * 3 * sum(math.prod(layout["shapes"][name]) for name in group.tensors)
        size += 8 * dims.get(group.gram, 0) ** 2
        if parts[-1] and used + size > part_bytes:
            parts.append([])
            used = 0
        parts[-1].append(group)
        used += size
    return parts


LAYOUT_FIELDS = ("shapes", "dtypes", "head", "label_set", "model_type", "config")  # what a layout reply must hold


class SiteLost(GramfuseError):
    """A site failed or was rejected after part of the merge was formed from its statistics."""

    def __init__(self, node_id: int) -> None:
        super().__init__(f"owner node {node_id} lost mid-merge")
        self.node_id = node_id


def owner_name(node_id: int) -> str:
    """How an owner is named in the merge and its output folder: by the node id Flower gave its site."""
    return f"node-{node_id}"


class FederationError(GramfuseError):
    """The federation cannot produce a merge (too few owners answered or fitted)."""


@dataclass
class OwnerRecord:
    node_id: int
    # asked, merged, failed, rejected, timed out, withdrawn (leave=true, no sums kept); with state-dir: removed,
    # inside (not asked)
    status: str = "asked"
    site: str = ""
    reason: str = ""
    examples: int = 0
    tokens: int = 0
    bytes_received: int = 0
    site_seconds: float = 0.0
    arrived_after_seconds: float = 0.0
    weights_from_base: int = 0  # a LoRA adapter site's untouched weights, taken from the server's base, not sent
    privacy: dict | None = None  # a site with differentially private statistics: their release (fusion.privacy)


class RegMeanStrategy(Strategy):
    """Gathers sums of what the methods need from every site and merges once. Works for every registered method.

    Given several methods (to compare them), each reply is decoded once and folded into one aggregation per
    distinct set of sums (RegMean at every alpha shares one), and ``out_dir`` gets one folder per method, named by
    its label (``regmean:alpha=0.5``), and ``report.json``.
    """

    def __init__(
        self,
        methods: MergeMethod | list[MergeMethod],
        out_dir: str | Path,
        *,
        min_owners: int = 2,
        timeout: float = 600.0,
        heads: str = "auto",
        base: dict | None = None,
        base_path: str | Path | None = None,
        overwrite: bool = True,
        record_dir: str | Path | None = None,
        part_bytes: int = DEFAULT_PART_BYTES,
        inputs: Iterable[str | Path] = (),
        workspace_owners: Iterable[str] = (),
        state_dir: str | Path | None = None,
    ) -> None:
        self.methods = methods if isinstance(methods, list) else [methods]
        self.base = base
        # The pretrained model is loaded as the sites' task once they have said what it is: a base folder is often
        # a bare body (BertModel) that only the owners' task class maps onto their parameter names.
        self.base_path = base_path if base is None and any(m.needs_base for m in self.methods) else None
        needing = [m.label() for m in self.methods if m.needs_base]
        if needing and base is None and not base_path:  # the operator's first error, before any site is asked
            raise FederationError(f"method {needing[0]!r} works relative to the base model: set the run config's "
                                  "base-path")
        # The base also stands in for the weights a LoRA adapter site leaves untouched, so they are never sent.
        self.base_folder = Path(base_path) if base_path else None
        self._base_files: tuple[CheckpointFiles, str] | None = None  # the base's tensors and fingerprint, once read
        self.from_base: dict[int, set[str]] = {}  # node id -> weights of its site the server takes from the base
        self.influence: dict[int, dict[str, Any]] = {}
        self.distances = OwnerDistances()  # how far the merge lies from each owner (plaintext mode)
        self.part_base: dict[str, torch.Tensor] = {}  # the base's tensors of the part being gathered
        self.part_bytes = part_bytes
        self.out_dir = Path(out_dir)
        # What the server reads (a simulation's workspace, the base): the output may not be, hold or lie in any.
        self.inputs = [*inputs, *([base_path] if base_path else []), *([state_dir] if state_dir else [])]
        self.state_dir = state_dir  # the sums kept between runs (server/state.py); None: each run stands alone
        self.keeper: StateKeeper | None = None
        self.workspace_owners = list(workspace_owners)  # a simulation's owner folders, one per simulated node
        self.min_owners = min_owners
        self.timeout = timeout
        self.overwrite = overwrite
        self.heads = heads
        self.record_dir = Path(record_dir) if record_dir else None
        self.aggregators = self.fresh_aggregators()
        self.leaving_aggregators = self.fresh_aggregators()  # with state-dir: the sites whose sums are subtracted
        self.layouts: dict[int, dict] = {}  # node id -> its site's layout: weight names, shapes, dtypes, statistics
        self.records: dict[int, OwnerRecord] = {}
        self.asked: dict[str, int] = {}  # message id -> node id
        self.fitting: list[int] | None = None  # the sites whose architecture fits the majority
        self.described: dict[int, dict] = {}  # node id -> what its site said it holds
        self.tokenizer: dict[str, bytes] = {}
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}
        # the finish, planned once the sites asked are known (plan_finish)
        self.outputs: list[Output] = []
        self.reference: dict = {}  # the layout the merged model follows
        self.context = MergeContext()
        self.groups: list[Group] = []
        self.common: dict[str, Any] = {}

    def fresh_aggregators(self) -> dict[tuple, Aggregator]:
        """One aggregation per distinct set of sums (RegMean at every alpha shares one)."""
        aggregators: dict[tuple, Aggregator] = {}
        for method in self.methods:
            context = MergeContext(base=self.base, diagonal=needs_diagonal(self.methods))
            aggregators.setdefault(method.sums_key(), Aggregator(method, context, self.heads))
        return aggregators

    # --- Flower's strategy lifecycle -------------------------------------------------------------------------------

    def request(self, **extra: Any) -> ConfigRecord:
        """What every site is asked for: the methods, and so which statistics."""
        return ConfigRecord({
            "method": ",".join(method.label() for method in self.methods),
            "needs-statistics": any(m.needs_statistics or m.needs_fisher for m in self.methods),
            "needs-fisher": any(m.needs_fisher for m in self.methods),
            **extra,
        })

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """Ask each fitting site (every connected one if none were described) for what the method needs."""
        request = self.request(**config)
        nodes = self.fitting if self.fitting is not None else list(grid.get_node_ids())
        for node_id in nodes:
            self.records.setdefault(node_id, OwnerRecord(node_id))
        return self._messages(nodes, MessageType.TRAIN, request, server_round)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        for reply in replies:
            self.add_reply(reply)
        return None, MetricRecord({"owners-merged": len(self.merged_owners)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list:
        return []  # evaluation happens at the sites or offline (`gramfuse evaluate`), on data the server never sees

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def begin(self) -> None:
        """Refuse an output folder among the inputs before any site is asked for anything; log the settings."""
        check_apart(self.out_dir, self.inputs)
        if self.state_dir is not None:
            self.keeper = StateKeeper(self.state_dir, self.methods)
        self.summary()

    def summary(self) -> None:
        log.info("gramfuse %s, at least %d owners, timeout %.0f s, output %s",
                 ", ".join(m.label() for m in self.methods), self.min_owners, self.timeout, self.out_dir)

    @property
    def merged_owners(self) -> list[str]:
        return next(iter(self.aggregators.values())).owners

    # --- one reply at a time -----------------------------------------------------------------------------------------

    def _intake(self, reply: Message, handle):
        """``handle(reply, node_id, record)``, or None where the site is recorded as failed (an error reply) or
        rejected (any input error ``handle`` raises), by node id, in the log and the report."""
        # Error replies made by the SuperLink (a node that stopped answering) come from it, not from the node.
        node_id = self.asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        record = self.records.setdefault(node_id, OwnerRecord(node_id))
        record.arrived_after_seconds = round(time.perf_counter() - self.started, 3)
        if reply.has_error():
            record.status, record.reason = "failed", reply.error.reason
            log.warning("owner node %d failed at its site: %s", node_id, reply.error.reason)
            return None
        try:
            return handle(reply, node_id, record)
        except GramfuseError as error:
            record.status, record.reason = "rejected", str(error)
        except (KeyError, TypeError, ValueError, AttributeError) as error:  # a reply shaped unlike any we send
            record.status, record.reason = "rejected", f"malformed reply ({type(error).__name__}: {error})"
        log.warning("owner node %d rejected: %s", node_id, record.reason)
        return None

    def add_reply(self, reply: Message) -> None:
        self._intake(reply, self._fold)

    def _fold(self, reply: Message, node_id: int, record: OwnerRecord) -> None:
        owner = self._decode(node_id, reply, record)
        self._check_declared(node_id, owner)
        leaving = self.keeper is not None and node_id in self.keeper.leaving
        aggregators = self.leaving_aggregators if leaving else self.aggregators
        for aggregator in aggregators.values():  # every check first: an owner goes into all sums or none
            aggregator.check(owner)
        for aggregator in aggregators.values():
            aggregator.fold(owner)
        if not leaving:
            self.distances.observe(owner.name, owner.params)
        record.status = "removed" if leaving else "merged"
        if owner.statistics is not None:
            record.examples = owner.statistics.example_count
            record.tokens = max(owner.statistics.token_counts.values(), default=0)
            record.privacy = owner.statistics.privacy
        log.info("owner node %d (%s) merged into the sums: %d examples, %.1f MB received", node_id, record.site,
                 record.examples, record.bytes_received / 1e6)

    def _check_declared(self, node_id: int, owner) -> None:
        """What a site sends must be what its layout declared, on which it was judged plausible."""
        layout = self.layouts.get(node_id, {})
        scales, traces = layout.get("scales", {}), layout.get("traces", {})
        for name, value in owner.params.items():
            if name in scales and not matches(scales[name], float(value.abs().max()) if value.numel() else 0.0):
                raise GramfuseError(f"owner node {node_id}: tensor {name!r} is not what its layout declared")
        stats = owner.statistics
        for key in (stats.grams if stats is not None else ()):
            if key in traces and not matches(traces[key], float(packed_diagonal(stats.grams[key],
                                                                                 stats.dims[key]).sum())):
                raise GramfuseError(f"owner node {node_id}: the Gram of {key!r} is not what its layout declared")

    def _meta(self, node_id: int, reply: Message, record: OwnerRecord) -> dict:
        try:
            config = reply.content[META]
            meta = json.loads(str(config["json"]))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (KeyError, ValueError) as error:
            raise GramfuseError(f"owner node {node_id}: malformed reply ({error})") from error
        record.site = str(meta.get("site", ""))
        record.site_seconds += float(meta.get("site_seconds", 0.0))
        if not self.tokenizer:
            self.tokenizer = {k[len(TOKENIZER):]: bytes(v) for k, v in config.items() if k.startswith(TOKENIZER)}
        return meta

    def _decode(self, node_id: int, reply: Message, record: OwnerRecord):
        meta = self._meta(node_id, reply, record)
        try:
            arrays = reply.content[PAYLOAD]
        except KeyError as error:
            raise GramfuseError(f"owner node {node_id}: malformed reply (no {PAYLOAD!r} record)") from error
        owner = owner_from_payload(owner_name(node_id), arrays.to_torch_state_dict(), meta)
        dtypes = self.layouts[node_id]["dtypes"] if node_id in self.layouts else {}  # checked with the layout
        filled = {name: value.to(dtype_from(dtypes[name])) for name, value in self.part_base.items()
                  if name in self.from_base.get(node_id, ())}
        owner.params.update(filled)
        record.weights_from_base += len(filled)
        return owner

    # --- LoRA adapter sites: their untouched weights come from the server's own base -------------------------------

    def base_files(self) -> tuple[CheckpointFiles, str]:
        """The base folder's tensors (read lazily) and its fingerprint, read once."""
        if self._base_files is None:
            files = CheckpointFiles(self.base_folder)
            self._base_files = files, files.fingerprint()
        return self._base_files

    def untouched(self, node_id: int, adapter: Any, shapes: dict[str, tuple]) -> set[str]:
        """The weights of a LoRA adapter site (``adapter``: what :func:`federation.payload.untouched_by_adapter`
        sent) that the server takes from its own ``base-path`` instead of asking for them: those the site leaves as
        its base's, where the server's base is that very base (same fingerprint) and the shapes agree. None where the
        Fisher is asked for (it is sent next to each weight)."""
        if not adapter:
            return set()
        if self.base_folder is None or any(m.needs_fisher for m in self.methods):
            log.info("owner node %d is a LoRA adapter: it sends every weight (give the server base-path, its base, "
                     "and it sends only the layers it adapted)", node_id)
            return set()
        try:
            fingerprint, untouched = str(adapter["base_fingerprint"]), [str(name) for name in adapter["untouched"]]
        except (KeyError, TypeError) as error:
            raise GramfuseError(f"owner node {node_id}: malformed adapter layout ({type(error).__name__}: {error})"
                                ) from error
        files, own_fingerprint = self.base_files()
        if fingerprint != own_fingerprint:
            log.warning("owner node %d is a LoRA adapter of another base than %s: it sends every weight", node_id,
                        self.base_folder)
            return set()
        return {name for name in untouched if name in files and tuple(files.shape(name)) == tuple(shapes.get(name, ()))}

    # --- the whole run -----------------------------------------------------------------------------------------------

    def prepare(self, grid: Grid) -> None:
        """Everything before the sums: wait for sites, learn what they hold and their layouts, and (with state-dir)
        which of them join or leave the kept sums."""
        self._wait_for_nodes(grid)
        self.describe(grid)
        self.gather_layouts(grid)
        self.sort_by_state()

    def forget(self, node_id: int) -> None:
        """A site lost after part of the merge was formed: its earlier parts are in the sums already written, so the
        only exact merge is one without it, from the start."""
        del self.layouts[node_id]
        if self.keeper is not None:
            self.keeper.joining.pop(node_id, None)
            self.keeper.leaving.pop(node_id, None)
        self.fitting = sorted(self.layouts)
        log.warning("owner node %d was lost after part of the merge was formed; merging again without it", node_id)

    def gather_layouts(self, grid: Grid) -> None:
        """Round 1: every fitting site's layout (weight names, shapes and dtypes, its statistics' metadata), no
        tensors; sites whose layout does not fit the first one's are rejected by node id."""
        messages = self.configure_train(1, ArrayRecord(), ConfigRecord(Part.LAYOUT.to_config()), grid)
        for reply in self._exchange(grid, messages, "layout"):
            self._intake(reply, self._accept_layout)
        if self.keeper is None:  # before plausibility: a withdrawn site's layout must not move the others' medians
            self.leave_out_withdrawn()
        self.check_plausible()
        self.fitting = sorted(self.layouts)
        self.timings["layout_seconds"] = round(time.perf_counter() - self.started, 3)

    def sort_by_state(self) -> None:
        """With state-dir: ask only the sites joining the server's sums and those leaving them; a site already inside
        is not asked for anything."""
        if self.keeper is None:
            return
        for node, (status, reason) in self.keeper.sort(self.layouts, self.owner_label).items():
            record = self.records[node]
            record.status, record.reason = status, reason
            (log.info if status == "inside" else log.warning)("owner node %d %s: %s", node, status, reason)
            del self.layouts[node]
        self.fitting = sorted(self.layouts)
        if not self.layouts:
            raise FederationError("state-dir: no site to add or remove (every site that answered is inside the "
                                  "server's sums already, or was rejected)")

    def leave_out_withdrawn(self) -> None:
        """Without state-dir: a site whose node config says ``leave=true`` has withdrawn from the merge, and a run
        that keeps no sums has nothing of it to subtract, so it is left out (merging it would undo its withdrawal)."""
        for node in [n for n, layout in self.layouts.items() if layout.get("leave")]:
            record = self.records[node]
            record.status, record.reason = "withdrawn", ("asks to leave (leave=true); this server keeps no sums "
                                                         "(no state-dir), so it is left out of the merge")
            log.warning("owner node %d withdrawn: %s", node, record.reason)
            del self.layouts[node]
        self.fitting = sorted(self.layouts)

    def owner_label(self, node: int) -> str:
        """A site's name in the server's sums: the name its node config gives, else its node id."""
        site = self.records[node].site if node in self.records else ""
        return site or owner_name(node)

    def check_plausible(self) -> None:
        """Reject the sites whose declared weights or Gram traces per token stand far above the others'
        (:mod:`server.plausibility`), and name a site that holds most of the summed Grams' weight."""
        found = outliers({node: layout.get("scales", {}) for node, layout in self.layouts.items()},
                         "the largest weight magnitude")
        for node, reason in outliers(per_token_traces(self.layouts), "the Gram trace per token").items():
            found.setdefault(node, reason)
        for node, reason in (privacy_misfits(self.layouts) | private_trace_misfits(self.layouts)).items():
            found.setdefault(node, reason)
        for node, reason in found.items():
            record = self.records[node]
            record.status, record.reason = "rejected", f"implausible: {reason}"
            log.warning("owner node %d rejected: %s", node, record.reason)
            del self.layouts[node]
        self.influence = influence(self.layouts)
        for node, shares in self.influence.items():
            if len(self.influence) > 1 and shares["largest_gram_share"] > DOMINANT_SHARE:
                log.warning("owner node %d holds %.1f%% of a summed Gram's trace (%.1f%% of the examples): its data "
                            "dominates the merge of that layer", node, 100 * shares["largest_gram_share"],
                            100 * shares["examples_share"])

    def _accept_layout(self, reply: Message, node_id: int, record: OwnerRecord) -> None:
        meta = self._meta(node_id, reply, record)
        self._check_layout(node_id, meta)
        self.from_base[node_id] = self.untouched(node_id, meta.get("adapter"),
                                                 {name: tuple(shape) for name, shape in meta["shapes"].items()})
        self.layouts[node_id] = meta

    def _check_layout(self, node_id: int, meta: dict) -> None:
        try:
            missing = [field for field in LAYOUT_FIELDS if field not in meta]
            if missing:
                raise KeyError(f"no {missing[0]!r}")
            shapes = {name: tuple(int(n) for n in shape) for name, shape in meta["shapes"].items()
                      if name not in set(meta["head"])}
            modules = {name: ModuleInfo(**info) for name, info in meta.get("statistics", {}).get("modules", {}).items()}
            for dtype in meta["dtypes"].values():
                dtype_from(dtype)
            labels_from(meta["label_set"])
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise GramfuseError(f"owner node {node_id}: malformed layout ({type(error).__name__}: {error})") from error
        if not self.layouts:
            return
        first_id = min(self.layouts)
        first = self.layouts[first_id]
        name, first_name = owner_name(node_id), owner_name(first_id)
        if meta["model_type"] != first["model_type"]:
            raise CompatibilityError(f"owner {name!r}: model type {meta['model_type']!r} differs from owner "
                                     f"{first_name!r}'s {first['model_type']!r}")
        check_same_shapes(name, shapes, first_name, {n: tuple(v) for n, v in first["shapes"].items()
                                                if n not in set(first["head"])})
        check_layout(name, modules, first_name,
                     {n: ModuleInfo(**i) for n, i in first.get("statistics", {}).get("modules", {}).items()})
        if self.heads == "shared" and meta["label_set"] != first["label_set"]:
            raise CompatibilityError(f"owner {name!r}: label set differs from owner {first_name!r}'s (heads are shared)")

    def sums_parts(self, grid: Grid) -> Iterator[tuple[list[Group], SumsOf]]:
        """The model a part at a time: each site is asked for the weights and Grams of a few groups of layers, its
        reply folded in as it arrives; yields each part's groups and their sums (raises :class:`SiteLost` where a
        site is lost after its first part)."""
        nodes = sorted(self.layouts)
        self._check_enough(len(self.keeper.remaining()) if self.keeper is not None else len(nodes))
        self.plan_finish(nodes)
        parts = partition(self.groups, self.reference, self.part_bytes)
        self.distances = OwnerDistances()
        for index, part in enumerate(parts, start=1):
            self.gather_part(grid, nodes, index, part)
            aggregator = next(iter(self.aggregators.values()))
            for out in self.outputs:
                if out.own_head is not None:
                    out.own_head.update(aggregator.own_heads.get(out.folder, {}))
            yield part, self._part_sums(self.outputs)
            log.info("part %d of %d merged: %d groups", index, len(parts), len(part))
        self.timings["parts"] = len(parts)
        self.timings["merge_seconds"] = round(time.perf_counter() - self.started, 3)

    def plan_finish(self, nodes: list[int]) -> None:
        """The outputs (a merged folder, and one per owner with a head of its own), the layer map and the groups,
        from the layouts of the sites asked (and, with state-dir, the owners inside the sums)."""
        names = [owner_name(node) for node in nodes]  # by node id: the tie-break of the reference label set
        layouts = {owner_name(node): self.layouts[node] for node in nodes}
        if self.keeper is None:
            own_heads = {name: {} for name in names if layouts[name]["head"]}  # filled as the heads' part arrives
            self.outputs = plan_outputs(names, {n: labels_from(m["label_set"]) for n, m in layouts.items()},
                                        {n: config_from(m) for n, m in layouts.items()}, own_heads)
            self.reference = layouts[self.outputs[0].owners[0]]
            records = {owner_name(r.node_id): r for r in self.records.values()}
            owners = [{"name": n, "node_id": records[n].node_id, "site": records[n].site} for n in names]
        else:
            self.outputs, self.reference = self.state_outputs(layouts)
            owners = [{"name": entry.name, "site": entry.name} for entry in self.keeper.remaining()]
        # Every site's hooked layers (adapter sites hook only those they adapted), as the offline merge takes them:
        # a layer some sites have no statistics for is averaged, with a warning naming it.
        modules = {name: ModuleInfo(**info) for layout in [*layouts.values(), self.reference]
                   for name, info in layout.get("statistics", {}).get("modules", {}).items()}
        gram_dtype = "float32" if any(m.get("statistics", {}).get("gram_dtype") == "float32"
                                      for m in layouts.values()) else "float64"
        self.context = MergeContext(base=self.base, modules=modules, gram_dtype=gram_dtype,
                                    diagonal=self.keeper.diagonal if self.keeper else needs_diagonal(self.methods))
        self.groups = plan_groups(list(self.reference["shapes"]), set(self.reference["head"]), modules)
        self.common = {"owners": owners,
                       "shared_label_set": len({json.dumps(m["label_set"]) for m in layouts.values()}) == 1}

    def finisher(self, roots: dict[str, Path]) -> Finisher:
        """The one finish (:class:`fusion.finish.Finisher`) the parts are written with."""
        dtypes = {name: dtype_from(dtype) for name, dtype in self.reference["dtypes"].items()}
        return Finisher(roots, self.methods, self.context, self.outputs, dtypes,
                        tokenizer=tokenizer_from_files(self.tokenizer), on_merged=self.distances.compare)

    def common_report(self) -> dict[str, Any]:
        """What every method's report says: the owners merged, whether they share a label set."""
        return self.common

    def state_meta(self) -> tuple:
        """With state-dir: what the kept sums' folder records beside them (meta, config, tokenizer)."""
        task = str(next(iter(self.described.values()), {}).get("task", ""))
        return (self.keeper.meta(self.reference, self.context, task), {}, config_from(self.reference),
                tokenizer_from_files(self.tokenizer))

    def state_outputs(self, layouts: dict[str, dict]) -> tuple[list[Output], dict]:
        """With state-dir: one output over every owner inside the sums after this run (one label set: heads summed),
        and the reference layout (the sites asked agree on it)."""
        if not layouts:
            raise FederationError("state-dir: no site joining or leaving is left in this run")
        reference = next(iter(layouts.values()))
        if any(labels_from(m["label_set"]) != labels_from(reference["label_set"]) for m in layouts.values()):
            raise FederationError("state-dir: the sites asked differ in label set; the server's sums hold one")
        names = [entry.name for entry in self.keeper.remaining()]
        if not names:
            raise FederationError("state-dir: every owner inside the sums leaves; nothing would be left to merge")
        labels, config = labels_from(reference["label_set"]), config_from(reference)
        return plan_outputs(names, {n: labels for n in names}, {n: config for n in names}, {}), reference

    def gather_part(self, grid: Grid, nodes: list[int], index: int, part: list[Group]) -> None:
        """Ask every site for one part's weights and Grams and fold the replies into fresh sums."""
        self.aggregators = self.fresh_aggregators()
        self.leaving_aggregators = self.fresh_aggregators()
        tensors = tuple(t for group in part for t in group.tensors)
        grams = tuple(sorted({group.gram for group in part if group.gram}))
        from_base = set(tensors) & set().union(*(self.from_base.get(node, set()) for node in nodes))
        self.part_base = self.base_files()[0].read(sorted(from_base)) if from_base else {}
        messages = []
        for node in nodes:  # an adapter site is not asked for the weights the server takes from the base
            asked = Part(tuple(t for t in tensors if t not in self.from_base.get(node, ())), grams)
            messages += self._messages([node], MessageType.TRAIN, self.request(**asked.to_config()), index + 1)
        self.aggregate_train(index + 1, self._exchange(grid, messages, f"train-{index}"))
        self.part_base = {}
        merged = set(self.merged_owners) | set(next(iter(self.leaving_aggregators.values())).owners)
        lost = [node for node in nodes if owner_name(node) not in merged]
        if lost:
            raise SiteLost(lost[0])

    def report_distances(self) -> None:
        """Each method's distance from each merged owner into the influence report, and a warning naming an owner
        the merge lies close to while far from every other (what inflated statistics achieve)."""
        nodes = {owner_name(node): node for node in self.influence}
        for method, by_owner in self.distances.relative().items():
            for owner, distance in by_owner.items():
                if owner in nodes:
                    self.influence[nodes[owner]].setdefault("merge_distance", {})[method] = distance
            near = near_one_owner(by_owner)
            if near is not None:
                log.warning("the %s merge lies close to owner node %d's model (%.3g of its norm away) and far from "
                            "every other owner's (at least %.3g): that owner steers it", method, nodes.get(near, -1),
                            by_owner[near], min(d for o, d in by_owner.items() if o != near))

    def _part_sums(self, outputs: list[Output]):
        if self.keeper is not None:
            return self.keeper.sums_of(next(iter(self.aggregators.values())),
                                       next(iter(self.leaving_aggregators.values())))
        by_key = {key: aggregator.sums_of(outputs) for key, aggregator in self.aggregators.items()}
        return lambda method, group: by_key[method.sums_key()](method, group)

    def _check_enough(self, count: int) -> None:
        if count < self.min_owners:
            problems = "; ".join(f"node {r.node_id}: {r.status} ({r.reason})" for r in self.records.values()
                                 if r.status not in ("merged", "asked"))
            raise FederationError(f"only {count} owners could be merged, min-owners is {self.min_owners}"
                                  + (f"; {problems}" if problems else ""))

    def describe(self, grid: Grid) -> None:
        descriptions = self._messages(grid.get_node_ids(), MessageType.QUERY, ConfigRecord(), 0)
        self.choose_fitting(list(self._exchange(grid, descriptions, "describe")))
        if self.base_path and self.fitting:
            self.base = load_base(self.base_path, self.described[self.fitting[0]].get("task"))
            self.aggregators = self.fresh_aggregators()
        self.timings["describe_seconds"] = round(time.perf_counter() - self.started, 3)

    def choose_fitting(self, replies: list[Message]) -> None:
        """Keep the sites of the most common architecture (and label set, where heads are shared); name the rest.

        Deciding by majority before any statistics are sent, rather than by whichever site answers first, keeps
        one misfit from turning every other site away.
        """
        groups: dict[str, list[int]] = {}
        for reply in replies:
            node_id = self.asked[reply.metadata.reply_to_message_id]
            record = self.records.setdefault(node_id, OwnerRecord(node_id))
            if reply.has_error():
                record.status, record.reason = "failed", reply.error.reason
                log.warning("owner node %d failed at its site: %s", node_id, reply.error.reason)
                continue
            try:
                described = json.loads(str(reply.content[META]["json"]))
                key = f"model type {described['model_type']!r}, body {described['body']}, " \
                      f"task {described.get('task', 'unknown')}"
                if self.heads == "shared":
                    key += f", labels {[label for _, label in described['label_set']]}"
                labels_from(described["label_set"])
            except (KeyError, ValueError, TypeError, AttributeError) as error:
                record.status = "rejected"
                record.reason = f"describe: malformed reply ({type(error).__name__}: {error})"
                log.warning("owner node %d rejected: %s", node_id, record.reason)
                continue
            self.described[node_id] = described
            groups.setdefault(key, []).append(node_id)
        if not groups:
            self.fitting = []
            return
        majority = min(groups, key=lambda k: (-len(groups[k]), min(groups[k])))
        self.fitting = sorted(groups[majority])
        for key, nodes in groups.items():
            for node_id in nodes if key != majority else ():
                record = self.records[node_id]
                record.status = "rejected"
                record.reason = f"{key} does not fit the {len(groups[majority])} sites of {majority}"
                log.warning("owner node %d rejected: %s", node_id, record.reason)

    def _wait_for_nodes(self, grid: Grid) -> None:
        # With state-dir the owners inside the sums need not connect: one site joining or leaving is a run.
        needed = 1 if self.keeper is not None else self.min_owners
        deadline = time.monotonic() + self.timeout
        while len(list(grid.get_node_ids())) < needed:
            if time.monotonic() > deadline:
                found = len(list(grid.get_node_ids()))
                raise FederationError(f"only {found} sites connected within {self.timeout:.0f} s; "
                                      f"{'state-dir needs one' if self.keeper else f'min-owners is {self.min_owners}'}")
            time.sleep(POLL_SECONDS)
        self._check_simulated_nodes(len(list(grid.get_node_ids())))

    def _check_simulated_nodes(self, nodes: int) -> None:
        """A simulation runs one node per owner folder, in name order: fewer nodes would leave owners out unseen."""
        left_out = self.workspace_owners[nodes:]
        if left_out:
            raise FederationError(
                f"the workspace holds {len(self.workspace_owners)} owners but the simulation runs {nodes} nodes: "
                f"{', '.join(left_out)} would be left out; run with --federation-config "
                f"\"num-supernodes={len(self.workspace_owners)}\"")

    def _messages(self, nodes: Iterable[int], kind: str, request: ConfigRecord, server_round: int) -> list[Message]:
        return [Message(content=RecordDict({"config": request}), dst_node_id=node_id, message_type=kind,
                        group_id=str(server_round)) for node_id in nodes]

    def _exchange(self, grid: Grid, messages: list[Message], stage: str) -> Iterator[Message]:
        """Send, then yield replies one at a time, each pulled only once the previous one has been dealt with.

        Every reply is counted (bytes per site) and, with ``record_dir``, saved as it came. Sites that have not
        answered within the timeout are recorded as timed out.
        """
        pushed = {message_id: message.metadata.dst_node_id
                  for message_id, message in zip(grid.push_messages(messages), messages) if message_id}
        self.asked.update(pushed)
        pending = dict(pushed)
        started = time.monotonic()
        deadline, next_note = started + self.timeout, started + PROGRESS_SECONDS
        while pending and time.monotonic() < deadline:
            if time.monotonic() >= next_note:  # sites may compute statistics for minutes: say the run is alive
                log.info("%s: %d of %d sites answered, %.0f s", stage, len(pushed) - len(pending), len(pushed),
                         time.monotonic() - started)
                next_note += PROGRESS_SECONDS
            arrived = False
            for message_id in list(pending):
                for reply in grid.pull_messages([message_id]):
                    pending.pop(message_id, None)
                    arrived = True
                    self._account(stage, pushed[message_id], reply)
                    yield reply
            if not arrived:
                time.sleep(POLL_SECONDS)
        for node_id in pending.values():
            record = self.records.setdefault(node_id, OwnerRecord(node_id))
            record.status, record.reason = "timed out", f"no reply within {self.timeout:.0f} s"
            log.warning("owner node %d timed out: no reply within %.0f s", node_id, self.timeout)

    def _account(self, stage: str, node_id: int, reply: Message) -> None:
        record = self.records.setdefault(node_id, OwnerRecord(node_id))
        if reply.has_error():
            return
        record.bytes_received += sum(int(item.count_bytes()) for item in reply.content.values())
        if self.record_dir is not None:
            record_reply(self.record_dir / f"{stage.replace('/', '-')}-node-{node_id}.safetensors", reply)

    def federation_report(self) -> dict[str, Any]:
        self.report_distances()
        return {
            "owners": {str(r.node_id): asdict(r) for r in self.records.values()},
            "merged": len(self.merged_owners),
            "min_owners": self.min_owners,
            "bytes_received": sum(r.bytes_received for r in self.records.values()),
            "timings": {**self.timings, "total_seconds": round(time.perf_counter() - self.started, 3)},
            "server_peak_rss_mb": round(peak_rss_mb(), 1),
            # each site's share of the examples and of the summed Grams' traces (plaintext mode: from the layouts)
            "influence": {str(node): shares for node, shares in self.influence.items()},
        }
