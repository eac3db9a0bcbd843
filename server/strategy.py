"""The aggregation server's Flower strategy: one round in which every site sends its statistics and weights.

Lifecycle, as Flower's strategies: ``configure_train`` asks each connected node for what the method needs;
``aggregate_train`` folds each reply into running sums *as it arrives* (see :meth:`RegMeanStrategy.run`, which pulls
replies one at a time), so the server holds one reply plus the sums whatever the number of owners; then
:meth:`merge` solves with ``fusion`` and writes exactly what ``gramfuse merge`` writes, plus ``report.json``.

An owner whose reply is an error, never comes, or does not fit the others (architecture, label set, statistics) is
named by node id in the log and the report, and left out; the merge goes on while ``min_owners`` still hold, and
fails with a clear message, writing nothing, below that.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from federation.audit import record_reply
from federation.payload import owner_from_payload
from federation.wire import META, PAYLOAD, TOKENIZER

from fusion.aggregate import Aggregator
from fusion.checkpoint import atomic_folder, tokenizer_from_files
from fusion.errors import GramfuseError
from fusion.finish import method_roots
from fusion.methods import MergeContext, MergeMethod
from fusion.methods.regmean import needs_diagonal

log = logging.getLogger("gramfuse.server")
REPORT_FILE = "report.json"
POLL_SECONDS = 0.5
PROGRESS_SECONDS = 30.0  # how often a step that waits on the sites logs how many have answered


def owner_name(node_id: int) -> str:
    """How an owner is named in the merge and its output folder: by the node id Flower gave its site."""
    return f"node-{node_id}"


class FederationError(GramfuseError):
    """The federation cannot produce a merge (too few owners answered or fitted)."""


@dataclass
class OwnerRecord:
    node_id: int
    status: str = "asked"  # asked, merged, failed, rejected, timed out
    site: str = ""
    reason: str = ""
    examples: int = 0
    tokens: int = 0
    bytes_received: int = 0
    site_seconds: float = 0.0
    arrived_after_seconds: float = 0.0


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
        overwrite: bool = True,
        record_dir: str | Path | None = None,
    ) -> None:
        self.methods = methods if isinstance(methods, list) else [methods]
        self.out_dir = Path(out_dir)
        self.min_owners = min_owners
        self.timeout = timeout
        self.overwrite = overwrite
        self.heads = heads
        self.record_dir = Path(record_dir) if record_dir else None
        self.aggregators: dict[tuple, Aggregator] = {}
        for method in self.methods:
            context = MergeContext(base=base, diagonal=needs_diagonal(self.methods))
            self.aggregators.setdefault(method.sums_key(), Aggregator(method, context, heads))
        self.records: dict[int, OwnerRecord] = {}
        self.asked: dict[str, int] = {}  # message id -> node id
        self.fitting: list[int] | None = None  # the sites whose architecture fits the majority
        self.described: dict[int, dict] = {}  # node id -> what its site said it holds
        self.tokenizer: dict[str, bytes] = {}
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}

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

    def summary(self) -> None:
        log.info("gramfuse %s, at least %d owners, timeout %.0f s, output %s",
                 ", ".join(m.label() for m in self.methods), self.min_owners, self.timeout, self.out_dir)

    @property
    def merged_owners(self) -> list[str]:
        return next(iter(self.aggregators.values())).owners

    # --- one reply at a time -----------------------------------------------------------------------------------------

    def add_reply(self, reply: Message) -> None:
        # Error replies made by the SuperLink (a node that stopped answering) come from it, not from the node.
        node_id = self.asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        record = self.records.setdefault(node_id, OwnerRecord(node_id))
        record.arrived_after_seconds = round(time.perf_counter() - self.started, 3)
        if reply.has_error():
            record.status, record.reason = "failed", reply.error.reason
            log.warning("owner node %d failed at its site: %s", node_id, reply.error.reason)
            return
        try:
            owner = self._decode(node_id, reply, record)
            for aggregator in self.aggregators.values():  # every check first: an owner goes into all sums or none
                aggregator.check(owner)
            for aggregator in self.aggregators.values():
                aggregator.fold(owner)
        except GramfuseError as error:
            record.status, record.reason = "rejected", str(error)
            log.warning("owner node %d rejected: %s", node_id, error)
            return
        record.status = "merged"
        if owner.statistics is not None:
            record.examples = owner.statistics.example_count
            record.tokens = max(owner.statistics.token_counts.values(), default=0)
        log.info("owner node %d (%s) merged into the sums: %d examples, %.1f MB received", node_id, record.site,
                 record.examples, record.bytes_received / 1e6)

    def _decode(self, node_id: int, reply: Message, record: OwnerRecord):
        try:
            arrays = reply.content[PAYLOAD]
            config = reply.content[META]
            meta = json.loads(str(config["json"]))
        except (KeyError, ValueError) as error:
            raise GramfuseError(f"owner node {node_id}: malformed reply ({error})") from error
        record.site = str(meta.get("site", ""))
        record.site_seconds = float(meta.get("site_seconds", 0.0))
        if not self.tokenizer:
            self.tokenizer = {k[len(TOKENIZER):]: bytes(v) for k, v in config.items() if k.startswith(TOKENIZER)}
        return owner_from_payload(owner_name(node_id), arrays.to_torch_state_dict(), meta)

    # --- the whole run -----------------------------------------------------------------------------------------------

    def run(self, grid: Grid) -> dict[str, Any]:
        """Wait for sites, ask each once, fold replies in as they arrive, merge. Returns the report."""
        self.summary()
        self._wait_for_nodes(grid)
        self.describe(grid)
        self.aggregate_train(1, self._exchange(grid, self.configure_train(1, ArrayRecord(), ConfigRecord(), grid),
                                               "train"))
        self.timings["gather_seconds"] = round(time.perf_counter() - self.started, 3)
        return self.merge()

    def describe(self, grid: Grid) -> None:
        descriptions = self._messages(grid.get_node_ids(), MessageType.QUERY, ConfigRecord(), 0)
        self.choose_fitting(list(self._exchange(grid, descriptions, "describe")))
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
            described = json.loads(str(reply.content[META]["json"]))
            self.described[node_id] = described
            key = f"model type {described['model_type']!r}, body {described['body']}"
            if self.heads == "shared":
                key += f", labels {[label for _, label in described['label_set']]}"
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
        deadline = time.monotonic() + self.timeout
        while len(list(grid.get_node_ids())) < self.min_owners:
            if time.monotonic() > deadline:
                found = len(list(grid.get_node_ids()))
                raise FederationError(f"only {found} sites connected within {self.timeout:.0f} s; "
                                      f"min-owners is {self.min_owners}")
            time.sleep(POLL_SECONDS)

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

    def merge(self) -> dict[str, Any]:
        merged_count = len(self.merged_owners)
        if merged_count < self.min_owners:
            problems = "; ".join(f"node {r.node_id}: {r.status} ({r.reason})" for r in self.records.values()
                                 if r.status != "merged")
            raise FederationError(f"only {merged_count} owners could be merged, min-owners is {self.min_owners}"
                                  + (f"; {problems}" if problems else ""))
        names = {owner_name(r.node_id): r for r in self.records.values()}
        owners = [{"name": name, "node_id": names[name].node_id, "site": names[name].site}
                  for name in sorted(self.merged_owners, key=lambda name: names[name].node_id)]
        tokenizer = tokenizer_from_files(self.tokenizer)
        solve_started = time.perf_counter()
        with atomic_folder(self.out_dir, self.overwrite) as staging:
            reports = self.write_merges(method_roots(staging, self.methods), {"owners": owners}, tokenizer)
            for label in reports:
                log.info("merged %d owners with %s", merged_count, label)
            self.timings["solve_and_write_seconds"] = round(time.perf_counter() - solve_started, 3)
            report = next(iter(reports.values())) if len(reports) == 1 else {"methods": reports}
            report = {**report, "federation": self.federation_report()}
            (staging / REPORT_FILE).write_text(json.dumps(report, indent=2))
        log.info("wrote %s", self.out_dir)
        return report

    def write_merges(self, roots: dict[str, Path], common: dict[str, Any], tokenizer: Any) -> dict[str, dict]:
        """Every method's merge, from the sums, through the one finish of every mode."""
        order = [owner["name"] for owner in common["owners"]]  # by node id: the tie-break of the reference labels
        reports = {}
        for key, aggregator in self.aggregators.items():
            methods = [method for method in self.methods if method.sums_key() == key]
            reports.update(aggregator.finish_into({m.label(): roots[m.label()] for m in methods}, methods,
                                                  order=order, report=common, tokenizer=tokenizer))
        return {method.label(): reports[method.label()] for method in self.methods}

    def _account(self, stage: str, node_id: int, reply: Message) -> None:
        record = self.records.setdefault(node_id, OwnerRecord(node_id))
        if reply.has_error():
            return
        record.bytes_received += sum(int(item.count_bytes()) for item in reply.content.values())
        if self.record_dir is not None:
            record_reply(self.record_dir / f"{stage}-node-{node_id}.safetensors", reply)

    def federation_report(self) -> dict[str, Any]:
        return {
            "owners": {str(r.node_id): asdict(r) for r in self.records.values()},
            "merged": len(self.merged_owners),
            "min_owners": self.min_owners,
            "bytes_received": sum(r.bytes_received for r in self.records.values()),
            "timings": {**self.timings, "total_seconds": round(time.perf_counter() - self.started, 3)},
            "server_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
