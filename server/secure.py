"""The secure-mode strategy: the server routes the protocol of :mod:`federation.protocol` and decodes sums only.

Lifecycle (each step one exchange with the sites that are still in): describe (as in plaintext mode) → ``keys``
(public keys and the layout of the sums: names and shapes, no values) → ``shares`` (sealed, routed unread) →
masked ``bounds`` → unmask → for each part of the model (a few groups of layers, their sums under ``part_bytes``):
masked ``sums/<part>`` → unmask → those groups solved and written, and their sums freed. The server so holds one
part's sums, never a whole model's. A site that stops answering after the shares were exchanged is *dropped*: in
the bounds round or the first part, its masks are removed with the survivors' shares and the merge goes on, while
at least ``threshold`` sites (and ``min-owners``) remain. A site lost in a later part ends the run, writing
nothing: its earlier parts are in the merge, and the only exact merge without it would release those parts again
without it, which tells its contribution by difference.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from federation.payload import config_from, labels_from
from federation.protocol import (BOUNDS, SHARE_KEY, Layout, MaskedSum, check_threshold, default_threshold,
                                 request_digest, round_names, shares_for, sums_round)
from federation.wire import MASKED, META, OWN_HEAD, TOKENIZER, WITHDRAWN

from fusion.checkpoint import tokenizer_from_files
from fusion.errors import GramfuseError
from fusion.finish import Finisher, Group, SumsOf
from fusion.finish import reference_label_set as majority_label_set
from fusion.merge import check_layout
from fusion.methods import MEAN, WEIGHT, MergeContext
from fusion.methods.regmean import NOISE_VARIANCE
from fusion.privacy import DISTRIBUTED, NoiseShares, PrivacyError
from fusion.secure import (
    BODY,
    bands_layout,
    check_secure_methods,
    decoded_sums,
    noised_units,
    owner_wide,
    owners_above_bound,
    scales_from_bands,
    secure_finisher,
    secure_report,
    sums_of_decoded,
    sums_parts,
    sums_plan,
)
from fusion.secure.fixedpoint import ABOVE_BOUND, BOUND_FACTOR, bound_bands
from fusion.statistics import ModuleInfo
from server.strategy import FederationError, OwnerRecord, RegMeanStrategy, owner_name

log = logging.getLogger("gramfuse.server")


KEYS_FIELDS = ("layout", "modules", "gram_dtype", "config", "label_set")  # what a keys reply's metadata must hold


class SecureRegMeanStrategy(RegMeanStrategy):
    """:class:`RegMeanStrategy` whose sites send only masked sums; ``threshold`` (0: a majority of the roster)
    is how many sites must survive each masked round for the dropped ones to be recovered."""

    def __init__(self, methods, out_dir, *, threshold: int = 0, bound_factor: float = BOUND_FACTOR,
                 noise: dict | None = None, **options: Any) -> None:
        check_secure_methods(methods if isinstance(methods, list) else [methods])
        super().__init__(methods, out_dir, **options)
        # Distributed DP noise (fusion.privacy.NoiseShares): epsilon, delta, clip, weight_bound, public to all sites.
        self.noise = distributed_noise(noise, self.methods) if noise else None
        if self.noise is not None:
            log.warning("dp-noise=distributed: every G W^T carries noise of its own, which the solve divides by a "
                        "ridge that shrinks with the noise; on the README's sentiment federation RegMean then fell "
                        "far below averaging at every epsilon measured, where local noise does not (README, "
                        "\"Differential privacy\")")
        if self.state_dir is not None:
            # Subtracting one owner's sum from a secure total would reveal it: removal must re-aggregate instead.
            raise FederationError("state-dir keeps plaintext sums; secure mode does not keep sums between runs "
                                  "(a removal is the remaining sites' next run without the owner: SECURITY.md)")
        self.threshold_setting = threshold
        self.bound_factor = bound_factor  # an owner's tensor may be this many times the median owner's (0: no bound)
        try:
            bound_bands(bound_factor)  # before any site is asked: a bad setting is the operator's first error
        except ValueError as error:
            raise FederationError(f"secure-bound: {error}") from None
        self.threshold = 0
        self.session = secrets.token_hex(16)  # fresh per run: keys, masks and shares are bound to it
        self.roster: dict[int, dict[str, bytes]] = {}
        self.commitments: dict[int, dict[str, bytes]] = {}
        self.sealed: dict[int, dict[int, bytes]] = {}  # sender -> recipient -> sealed shares
        self.site_meta: dict[int, dict] = {}
        self.layout: Layout = []
        self.survivors: list[int] = []
        self.own_heads: dict[int, dict] = {}
        self.means_from_base: dict[str, str] = {}  # layout key of a weighted mean -> the base weight that forms it
        self.rounds: dict[str, dict[str, list[int]]] = {}
        self.modules: dict[str, ModuleInfo] = {}  # the layer map the sums are merged by
        self.parts: list[tuple[list[Group], Layout]] = []  # the groups of each sums round, and its share of the layout
        self.participants: list[int] = []  # the sites the next masked round asks
        self.scales: dict[str, int] = {}  # every sum's fixed-point scale, from the bounds round

    def request(self, **extra: Any) -> ConfigRecord:
        request = super().request(**extra)
        if self.noise is not None:
            request["dp-distributed"] = json.dumps(self.noise.public())
        return request

    @property
    def merged_owners(self) -> list[str]:
        return [owner_name(node) for node in self.survivors]

    def prepare(self, grid: Grid) -> None:
        """Everything before the sums: sites described, keys and layout agreed, the parts planned, shares exchanged,
        and the bounds round that fixes the fixed-point scales."""
        self._wait_for_nodes(grid)
        self.describe(grid)
        self.exchange_keys(grid)
        self.plan_parts()
        participants = self.exchange_shares(grid)
        band_sums, self.participants = self.masked_round(grid, BOUNDS, participants, {})
        self.hold_to_bound(band_sums, len(self.participants))
        self.scales = scales_from_bands(band_sums, len(self.participants), self.bound_factor)

    # --- the steps ---------------------------------------------------------------------------------------------------

    def reference_label_set(self) -> list:
        """The label set of most fitting sites (ties: the lowest node id's): its heads are summed (securely) with the
        body, by the rule of every mode (:func:`fusion.finish.reference_label_set`)."""
        nodes = sorted(self.fitting or [])
        if not nodes:
            raise FederationError("no site fits: nothing to merge")
        label_sets = [labels_from(self.described[node]["label_set"]) for node in nodes]
        return [list(item) for item in majority_label_set(label_sets)]

    def hold_to_bound(self, band_sums: dict, owners: int) -> None:
        """Say which tensors have owners above the agreed bound: the scales leave them no room, so they cannot
        encode and drop out at the first part of the sums, rejected as misfits (the histogram says how many; the
        drop, which). Summed bands that are not a histogram of ``owners`` one-hot vectors mean the masks did not
        cancel (a site of another version, or garbage): the run ends, saying so."""
        for key, counts in band_sums.items():
            signed = np.asarray(counts, dtype=np.uint64).view(np.int64)
            if (signed < 0).any() or int(signed.sum()) > owners:
                raise FederationError(f"secure: the summed magnitude bands of {key!r} are not a histogram of "
                                      f"{owners} sites: the masks did not cancel (a site of another version, or "
                                      "one sending garbage); nothing is written")
        above = owners_above_bound(band_sums, self.bound_factor)
        self.rounds["bound"] = {"factor": self.bound_factor, "owners_above": above}
        if above:
            log.warning("secure: %d tensors have owners above the agreed bound (%g times the median owner's "
                        "magnitude), at most %d owners: they cannot encode those tensors and drop out; first: %s",
                        len(above), self.bound_factor, max(above.values()), next(iter(sorted(above))))

    def exchange_keys(self, grid: Grid) -> None:
        reference = self.reference_label_set()
        request = self.request(session=self.session, **{"reference-label-set": json.dumps(reference)})
        messages = self._messages(self.fitting, MessageType.QUERY + ".secure_keys", request, 1)
        for reply in self._exchange(grid, messages, "keys"):
            node = self._answered(reply, "keys")
            if node is None:
                continue
            try:
                config = reply.content[META]
                meta = json.loads(str(config["json"]))
                meta["layout"] = [(str(key), tuple(int(n) for n in shape)) for key, shape in meta["layout"]]
                keys = {SHARE_KEY: bytes(config[f"key/{SHARE_KEY}"])}
                missing = [field for field in KEYS_FIELDS if field not in meta]
                if missing:
                    raise KeyError(f"no {missing[0]!r}")
                labels_from(meta["label_set"]), dict(meta["modules"])
            except (KeyError, ValueError, TypeError, AttributeError) as error:
                self._lose(node, "rejected", f"keys: malformed reply ({type(error).__name__}: {error})")
                continue
            self.records[node].site = str(meta.get("site", ""))
            self.site_meta[node] = meta
            self.roster[node] = keys
            if not self.tokenizer:
                self.tokenizer = {k[len(TOKENIZER):]: bytes(v) for k, v in config.items() if k.startswith(TOKENIZER)}
        self._agree_layout(reference)
        self.take_from_base()
        self.threshold = self.threshold_setting or default_threshold(len(self.roster))
        try:
            check_threshold(self.threshold, len(self.roster))  # the sites check it too, and refuse
        except GramfuseError as error:
            raise FederationError(f"secure-threshold: {error} that sent keys") from error
        if len(self.roster) < 3:
            log.warning("secure mode with %d sites: each one can work out the other's contribution from the merge",
                        len(self.roster))
        log.info("secure: %d sites exchanged keys (session %s), threshold %d", len(self.roster), self.session[:8],
                 self.threshold)

    def _agree_layout(self, reference: list) -> None:
        """The layout of the sums is that of the merged label set's first site; every site must have it (the body's
        part, for a site with a label set of its own). A site that does not is turned away before any shares.

        LoRA adapter sites hook only the layers they adapted, so their statistics' sums may differ in which layers
        they cover (never in shape, nor in which Gram a layer reads). Only the sums every site has are masked: a sum
        some sites lack would decode to the others' alone, and one site's at worst. A layer whose statistics are left
        out is averaged, as the offline merge averages a layer some owners have no statistics for."""
        in_reference = sorted(n for n, meta in self.site_meta.items() if meta["label_set"] == reference)
        if not in_reference:
            raise FederationError("no site of the merged label set sent its keys: nothing to merge")
        first = self.site_meta[in_reference[0]]
        full = dict(first["layout"])
        body = {k: v for k, v in full.items() if f"/{BODY}" in k}
        for node, meta in list(self.site_meta.items()):
            expected, layout = (full if node in in_reference else body), dict(meta["layout"])
            problem = self._layout_misfit(expected, layout, bool(meta.get("adapter") and first.get("adapter")))
            if problem is None:
                try:
                    check_layout(owner_name(node), {n: ModuleInfo(**i) for n, i in meta["modules"].items()},
                                 owner_name(in_reference[0]),
                                 {n: ModuleInfo(**i) for n, i in first["modules"].items()})
                except GramfuseError as error:
                    problem = str(error)
                except (KeyError, TypeError, AttributeError) as error:
                    problem = f"malformed layer map ({type(error).__name__}: {error})"
            if problem is not None:
                self._lose(node, "rejected", problem)
                self.roster.pop(node), self.site_meta.pop(node)
        layouts = {node: dict(meta["layout"]) for node, meta in self.site_meta.items()}
        self.layout = sorted((key, shape) for key, shape in full.items()
                             if all(key in layout for node, layout in layouts.items()
                                    if node in in_reference or f"/{BODY}" in key))
        left_out = len(full) - len(self.layout)
        if left_out:
            log.info("secure: %d sums of layers only some adapter sites adapted are left out (those layers are "
                     "averaged)", left_out)

    @staticmethod
    def _layout_misfit(expected: dict, layout: dict, adapters: bool) -> str | None:
        """Why a site's layout does not fit the reference's, or None: a shape differs, or (unless both are adapter
        sites, which hook different layers) a sum is missing on either side."""
        # Only sites with differentially private statistics sum their noise's variance. Compare whether each side
        # has any such key, not the key sets: DP adapter sites that adapted different layers differ in which.
        mine_private, reference_private = (any(f"/{NOISE_VARIANCE}" in key for key in side)
                                           for side in (layout, expected))
        if mine_private != reference_private:
            return (f"{'its' if mine_private else 'the reference'} statistics are differentially private and "
                    "the other's are not (Grams on different scales; every site must release DP statistics, or none)")
        for key in sorted(set(expected) | set(layout)):
            mine, theirs = layout.get(key), expected.get(key)
            if mine != theirs and (mine is not None and theirs is not None or not adapters):
                return (f"sum {key!r} has shape {mine}, the merged label set's has {theirs} (another architecture "
                        "or layer map)")
        return None

    def take_from_base(self) -> None:
        """Leave out of the masked sums the weighted means of the weights that every site leaves as its base's (LoRA
        adapter sites, with the server holding that base as ``base-path``): no site sends them, and after decoding
        the server forms each as (the decoded sum of the sites' weights) x W0, which is what they sum to."""
        means: dict[str, list[str]] = {}
        shapes: dict[str, tuple] = {}
        for key, shape in self.layout:
            index, _, rest = key.partition(f"/{BODY}")
            if rest.startswith(MEAN):  # a weighted mean (fusion.methods.weighted), beside its group's weight total
                means.setdefault(rest[len(MEAN):], []).append(key)
                shapes[rest[len(MEAN):]] = shape
        common: set[str] | None = None
        for node, meta in list(self.site_meta.items()):
            try:
                untouched = self.untouched(node, meta.get("adapter"), shapes)
            except GramfuseError as error:
                self._lose(node, "rejected", str(error))
                self.roster.pop(node), self.site_meta.pop(node)
                continue
            common = untouched if common is None else common & untouched
        self.means_from_base = {key: name for name in common or () for key in means[name]}
        self.layout = [(key, shape) for key, shape in self.layout if key not in self.means_from_base]
        if common:
            for node in self.site_meta:
                self.records[node].weights_from_base = len(common)
            log.info("secure: %d weights every site leaves as the base's are taken from %s, not sent", len(common),
                     self.base_folder)

    def fill_from_base(self, sums: dict, groups: list[Group]) -> None:
        """The weighted means of ``groups``' weights that every site leaves as its base's: weight total x W0."""
        names = {name for group in groups for name in group.tensors}
        wanted = {key: name for key, name in self.means_from_base.items() if name in names}
        files = self.base_files()[0] if wanted else None
        for key, name in wanted.items():
            total = sums[key.split("/", 1)[0] + f"/{BODY}{WEIGHT}"]
            sums[key] = total * files.read([name])[name].double()

    def exchange_shares(self, grid: Grid) -> list[int]:
        roster = json.dumps({str(n): {p: k.hex() for p, k in keys.items()} for n, keys in self.roster.items()})
        rounds = round_names(len(self.parts))
        request = ConfigRecord({"roster": roster, "threshold": self.threshold, "rounds": json.dumps(rounds)})
        messages = self._messages(sorted(self.roster), MessageType.QUERY + ".secure_shares", request, 1)
        for reply in self._exchange(grid, messages, "shares"):
            node = self._answered(reply, "shares")
            if node is None:
                continue
            try:
                config = reply.content[META]
                commitments = {r: bytes(config[f"commitment/{r}"]) for r in rounds}
                round_keys = {r: bytes(config[f"key/{r}"]) for r in rounds}
                sealed = {int(k[len("share/"):]): bytes(v) for k, v in config.items() if k.startswith("share/")}
            except (KeyError, ValueError) as error:
                self._lose(node, "rejected", f"shares: malformed reply ({error})")
                continue
            missing = sorted(set(self.roster) - set(sealed) - {node})
            if missing:
                self._lose(node, "rejected", f"shares: none for node {missing[0]}")
                continue
            self.sealed[node], self.commitments[node] = sealed, commitments
            self.roster[node] = {**self.roster[node], **round_keys}
        participants = sorted(self.sealed)
        self._enough(participants, "shares")
        log.info("secure: shares exchanged among %d sites", len(participants))
        return participants

    def masked_round(self, grid: Grid, round_name: str, participants: list[int], extra: dict,
                     part: Layout | None = None) -> tuple[dict, list[int]]:
        """One masked round and its unmasking: the survivors' sum (of ``part`` of the layout, for a sums round),
        and the survivors. In a sums round after the first, a participant lost ends the run before unmasking."""
        layout = bands_layout(self.layout) if round_name == BOUNDS else part
        common = {"round": round_name, "participants": json.dumps(participants), "layout": json.dumps(self.layout),
                  "reference-label-set": json.dumps(self.reference_label_set()), **extra}
        if part is not None:
            common["part"] = json.dumps([key for key, _ in part])
        summed = MaskedSum(round_name, self.session, self.roster, self.commitments, participants, self.threshold,
                           layout, request_digest(self.request(**common)))
        messages = []
        for node in participants:
            request = self.request(**common)
            if round_name == BOUNDS:  # the shares and mask keys addressed to this site travel with its first request
                shares = shares_for(node, self.sealed, participants)
                for sender, share in shares.items():
                    request[f"share/{sender}"] = share
                request["round-keys"] = json.dumps({str(sender): {r: key.hex() for r, key in self.roster[sender].items()
                                                                  if r != SHARE_KEY} for sender in shares})
            messages.append(Message(content=RecordDict({"config": request}), dst_node_id=node,
                                    message_type=MessageType.TRAIN + ".secure_masked", group_id=round_name))
        for reply in self._exchange(grid, messages, round_name):
            node = self._answered(reply, round_name)
            if node is None:
                continue
            try:
                summed.add(node, {key: array.numpy() for key, array in reply.content[MASKED].items()})
            except (GramfuseError, KeyError) as error:
                self._lose(node, "rejected", f"{round_name}: {error}")
                continue
            if OWN_HEAD in reply.content:
                self.own_heads[node] = reply.content[OWN_HEAD].to_torch_state_dict()
        self.rounds[round_name] = {"participants": participants, "survivors": sorted(summed.survivors),
                                   "dropped": summed.dropped}
        if summed.dropped and round_name not in (BOUNDS, sums_round(1)):
            raise FederationError(
                f"secure: owner node {summed.dropped[0]} was lost in {round_name} of {len(self.parts)} "
                f"({self.records[summed.dropped[0]].reason or 'no reply'}), after earlier parts of the model were "
                "summed with it: a merge without it would sum those parts again without it, which tells its "
                "contribution by difference (its sites' ledgers refuse that too); nothing is written. Run again with "
                "it back")
        self._enough(summed.survivors, round_name)
        for node in summed.dropped:
            log.warning("owner node %d dropped out of the %s round: its masks are removed with the others' shares",
                        node, round_name)
        revealed = self.unmask(grid, round_name, summed)
        totals = summed.unmask(revealed)
        log.info("secure: %s round summed over %d sites (%d dropped, recovered)", round_name, len(summed.survivors),
                 len(summed.dropped))
        return totals, sorted(summed.survivors)

    def unmask(self, grid: Grid, round_name: str, summed: MaskedSum) -> dict[int, dict[int, bytes]]:
        request = ConfigRecord({"round": round_name, "survivors": json.dumps(sorted(summed.survivors)),
                                "dropped": json.dumps(summed.dropped)})
        messages = self._messages(sorted(summed.survivors), MessageType.QUERY + ".secure_unmask", request, 2)
        revealed = {}
        for reply in self._exchange(grid, messages, f"unmask-{round_name}"):
            node = self._answered(reply, f"unmasking {round_name}")
            if node is None:
                continue
            try:
                config = reply.content[META]
                revealed[node] = {int(k[len("share/"):]): bytes(v) for k, v in config.items() if k.startswith("share/")}
            except (KeyError, ValueError, TypeError) as error:  # its shares are left out; the others' may suffice
                self._lose(node, "rejected", f"unmasking {round_name}: malformed reply ({type(error).__name__}: "
                           f"{error})")
        if len(revealed) < self.threshold:
            raise FederationError(f"secure: only {len(revealed)} sites answered the unmasking of {round_name}, the "
                                  f"threshold is {self.threshold}: the sum cannot be recovered")
        return revealed

    # --- bookkeeping -------------------------------------------------------------------------------------------------

    def _answered(self, reply: Message, step: str) -> int | None:
        node = self.asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            misfit = ABOVE_BOUND in reply.error.reason  # its statistics are far larger than the other owners'
            status = "withdrawn" if WITHDRAWN in reply.error.reason else "rejected" if misfit else "failed"
            self._lose(node, status, f"{step}: {reply.error.reason}")
            return None
        return node

    def _lose(self, node: int, status: str, reason: str) -> None:
        record = self.records.setdefault(node, OwnerRecord(node))
        if record.status in ("failed", "rejected", "withdrawn"):
            return
        record.status, record.reason = status, reason
        log.warning("owner node %d %s: %s", node, status, reason)

    def _enough(self, nodes: list[int], step: str) -> None:
        needed = max(self.threshold, self.min_owners)
        if len(nodes) < needed:
            raise FederationError(f"secure: only {len(nodes)} sites took part in {step}; at least {needed} "
                                  f"(threshold {self.threshold}, min-owners {self.min_owners}) are needed")

    def plan_parts(self) -> None:
        """The layer map the sums are merged by (the first site of the merged label set wins), and the parts of the
        model that the sums rounds go by, each part's sums under ``part_bytes``."""
        reference = self.reference_label_set()
        nodes = sorted(self.site_meta)
        first = next((n for n in nodes if self.site_meta[n]["label_set"] == reference), nodes[0])
        self.modules = {name: ModuleInfo(**info) for node in [*nodes, first]
                        for name, info in self.site_meta[node]["modules"].items()}
        keys = [key for key, _ in self.layout] + list(self.means_from_base)
        self.parts = sums_parts(self.layout, sums_plan(self.methods, keys, self.modules), self.part_bytes)
        self.timings["parts"] = len(self.parts)
        log.info("secure: the sums go in %d parts of the model", len(self.parts))

    def sums_parts(self, grid: Grid) -> Iterator[tuple[list[Group], SumsOf]]:
        """The sums rounds, part by part: yields each part's groups and their decoded sums. The first part fixes the
        owners merged (its survivors) and the owner-wide sums every later part is merged with."""
        shared = {}
        for index, (groups, part) in enumerate(self.parts, start=1):
            # With the first part, every scale: a site that cannot encode some later part drops out now, recovered.
            scales = self.scales if index == 1 else {key: self.scales[key] for key, _ in part}
            extra = {"scales": json.dumps(scales)}
            totals, self.participants = self.masked_round(grid, sums_round(index), self.participants, extra, part)
            sums = decoded_sums(part, totals, self.scales)
            if index == 1:
                self.survivors = self.participants
                self._check_enough(len(self.survivors))
                shared = owner_wide(sums)
            sums.update(shared)
            self.fill_from_base(sums, groups)
            yield groups, sums_of_decoded(self.methods, sums)
            log.info("secure: part %d of %d merged: %d groups", index, len(self.parts), len(groups))
        for node in self.survivors:  # in every part's sums (a site that failed only to unmask, too)
            self.records[node].status = "merged"
        self.timings["merge_seconds"] = round(time.perf_counter() - self.started, 3)

    def finisher(self, roots: dict[str, Path]) -> Finisher:
        """The one finish, once the first part has named the owners merged and brought their own heads."""
        return secure_finisher(roots, self.methods, [g for groups, _ in self.parts for g in groups],
                               self.merge_context(), self.owners_of_merge(), self.survivors_heads(),
                               labels_from(self.reference_label_set()), tokenizer=tokenizer_from_files(self.tokenizer))

    def common_report(self) -> dict[str, Any]:
        names = {owner_name(r.node_id): r for r in self.records.values()}
        owners = [{"name": name, "node_id": names[name].node_id, "site": names[name].site}
                  for name in sorted(self.merged_owners, key=lambda name: names[name].node_id)]
        return secure_report({"owners": owners}, self.owners_of_merge())

    def merge_context(self) -> MergeContext:
        return MergeContext(modules=self.modules,
                            gram_dtype="float32" if any(self.site_meta[n]["gram_dtype"] == "float32"
                                                        for n in self.survivors) else "float64")

    def owners_of_merge(self) -> dict[str, tuple]:
        """Owner name -> (label set, config), the survivors in node order."""
        return {owner_name(node): (labels_from(self.site_meta[node]["label_set"]), config_from(self.site_meta[node]))
                for node in sorted(self.survivors)}

    def survivors_heads(self) -> dict[str, dict]:
        return {owner_name(node): params for node, params in self.own_heads.items() if node in self.survivors}

    def federation_report(self) -> dict[str, Any]:
        report = super().federation_report()
        report["secure"] = {"session": self.session, "threshold": self.threshold, "rounds": self.rounds,
                            "heads_sent_in_clear": sorted(owner_name(n) for n in self.own_heads)}
        if self.noise is not None:
            releases = len(noised_units(self.methods, self.layout, self.noise.weight_bound))
            report["privacy"] = {
                "noise": DISTRIBUTED, **self.noise.public(), "releases": releases,
                "noise_multiplier": self.noise.noise_multiplier,
                # each survivor added 1/threshold of the noise (epsilon, delta) needs: the sum carries this many times
                "noise_variance_over_needed": len(self.survivors) / max(self.threshold, 1),
            }
        return report


def distributed_noise(settings: dict, methods) -> NoiseShares:
    """The run's distributed DP noise from the run config, checked before any site is asked."""
    try:
        noise = NoiseShares(float(settings["epsilon"]), float(settings["delta"]), float(settings["clip"]),
                            float(settings["weight_bound"]), threshold=1)
    except PrivacyError as error:
        raise FederationError(f"dp-noise={DISTRIBUTED}: {error}") from None
    unable = [method.label() for method in methods if not method.noisable or getattr(method, "weighting", "sum") != "sum"]
    if unable:
        raise FederationError(f"dp-noise={DISTRIBUTED}: method {unable[0]!r} cannot add distributed DP noise to its "
                              "sums (regmean with weighting 'sum' can, and methods without statistics)")
    return noise
