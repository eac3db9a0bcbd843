"""The data-site Flower ClientApp: statistics at the site, only statistics and weights leave it.

Node config (``flower-supernode --node-config "model-path='…' data-path='…'"``):

- ``model-path``, ``data-path`` (required in a deployment): the site's fine-tuned model folder and its data file;
- ``max-length`` (128), ``batch-size`` (32), ``max-examples`` (all), ``task``, ``text-field``, ``label-field``,
  ``pair-field``: as for ``gramfuse stats`` (every task type it supports);
- ``name``: a label for the site in the server's report (the node id is always reported);
- ``base-path``: where ``model-path`` is a LoRA adapter folder, its base model folder (default: the one its
  ``adapter_config.json`` names); the site sends the adapter's effective weights, only those of the layers it
  adapted where the server holds the same base (it says which, with its base's fingerprint, in its layout);
- ``ledger-path`` (``<model-path>/gramfuse-ledger.json``), ``min-roster-difference`` (3): the site's record of the
  secure sums it contributed to; it refuses a secure run whose roster differs from an earlier one of the same
  contribution by fewer sites than that (and more than none): the two sums would reveal those sites
  (:mod:`federation.ledger`);
- ``require-secure`` (false): refuse any plaintext request for weights and statistics (in a secure run a site
  refuses them anyway);
- ``dp-epsilon`` (0: off), ``dp-delta`` (0: ``1 / N^2`` for ``N`` examples), ``dp-clip`` (1.0), ``dp-budget``
  (``dp-epsilon``): differentially private statistics (:mod:`fusion.privacy`); every noise draw is recorded in
  ``<data-path>.gramfuse-dp-budget.json`` (or ``dp-budget-path``) and a draw that would take the composed epsilon
  past ``dp-budget`` is refused. A drawn statistics file is reused across runs at no further cost. In a secure run
  with distributed noise (run config ``dp-noise=distributed``) the run sets the guarantee, which the site checks
  against its own ``dp-epsilon``/``dp-delta``: it keeps clipped statistics (``gramfuse-stats-clipped.safetensors``)
  and adds its share of fresh noise in every run, each run charged to the same budget;
- ``share-head`` (false): in secure mode, a site whose label set differs from the merged one may send its own
  head, in the clear (it cannot be summed with anyone's), to get a folder with the merged body and that head.

In a local simulation the node has no such keys; it takes owner number ``partition-id`` (in name order) of the
run config's ``workspace``, a folder of ``<owner>/model/`` and ``<owner>/data.jsonl``.

The statistics file already in the model folder is reused when it was made from these weights with these settings
(and holds the Fisher where the method needs it); otherwise the statistics are computed and saved there.
"""

from __future__ import annotations

import functools
import hashlib
from itertools import chain
import json
import logging
import secrets
import time
from dataclasses import asdict
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from federation.crypto import SecureProtocolError
from federation.ledger import LEDGER_FILENAME, MIN_DIFFERENCE, Ledger, contribution_of
from federation.payload import Part, describe_model, owner_payload, untouched_by_adapter, wire_tensor
from federation.protocol import BOUNDS, OwnerSession, request_digest, sums_round
from federation.wire import MASKED, META, OWN_HEAD, PAYLOAD, TOKENIZER, WITHDRAWN

from fusion.aggregate import owner_update
from fusion.checkpoint import load_model, public_config_json, tokenizer_files
from fusion.errors import CompatibilityError, GramfuseError, StatisticsError
from fusion.finish import plan_groups
from fusion.methods import method_from_spec
from fusion.secure import (BODY, band_vectors, bands_layout, encoded_vectors, noised_units, public_bounds,
                           secure_contributions)
from fusion.adapters import checkpoint_files
from fusion.secure.fixedpoint import check_encodable
from fusion.statistics import STATS_FILENAME, load_statistics
from fusion.budget import PrivacyBudget, budget_path
from fusion.privacy import DISTRIBUTED_MECHANISM, NoiseShares, PrivacyError, PrivacySpec
from fusion.workflows import DataSettings, compute_statistics, expected_settings

log = logging.getLogger("gramfuse.client")
app = ClientApp()
# Errors whose messages hold no value of the site's data or statistics (protocol steps, architectures): sent as
# they are. Any other error is sent as its public form, or as its kind alone; the full text stays in the site's log.
PUBLIC_ERRORS = (SecureProtocolError, CompatibilityError)


def public_reason(error: BaseException) -> str:
    """What the server may read of a site's error (Flower forwards the message of what a ClientApp raises)."""
    if isinstance(error, PUBLIC_ERRORS):
        return str(error)
    public = getattr(error, "public", None)
    kind = type(error).__name__
    return f"{kind}: {public}" if public else f"{kind} at the site (the detail stays in the site's log)"


def private_errors(handler):
    """A ClientApp handler whose errors reach the server without any value of the site's data."""

    @functools.wraps(handler)
    def answer(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as error:
            log.error("%s refused: %s", handler.__name__, error, exc_info=not isinstance(error, GramfuseError))
            raise GramfuseError(public_reason(error)) from None

    return answer
SECURE_STATE = "gramfuse-secure"  # this site's secrets for the run, in the node's context: they never leave it
CONTRIBUTION = "contribution"  # in the session: what this site adds to the run's sums (federation.ledger)
NOISE_SEED = "dp-seed"  # in the session: the seed of this site's distributed DP noise for the run (never sent)
NOISE_REQUEST = "dp-distributed"  # in the session: the run's distributed DP noise its keys were sent for
NOISE_DRAW = "dp-draw"  # in the session: this site's own id of the run's noise draw, for its budget record
RELEASED = "released"  # in the session: the sums this site has sent in the run's parts (each once)
AGREED_LAYOUT = "agreed-layout"  # in the session: the digest of the layout of the bounds round, held for the run
MAGNITUDES = "magnitudes"  # in the session: the largest magnitude of each of its sums (never sent)
SCALES = "scales"  # in the session: the fixed-point scales of the first part, held for the run
CLIPPED_STATS_FILENAME = "gramfuse-stats-clipped.safetensors"  # clipped, noise-free: the site's alone


def noise_draw(session: OwnerSession) -> str:
    """This site's budget entry for the run: the server's session id is not enough (another site over the same data
    in the same run, or a server reusing an id, would get fresh noise uncharged), so a random id of the site's own
    names it (not derived from the seed: the budget file must not help anyone find the noise)."""
    return f"secure/{session.session[:16]}/{session.state[NOISE_DRAW]}"



def site_paths(context: Context) -> tuple[Path, Path]:
    node = context.node_config
    if "model-path" in node and "data-path" in node:
        return Path(str(node["model-path"])), Path(str(node["data-path"]))
    workspace = context.run_config.get("workspace")
    if "partition-id" not in node or not workspace:
        raise GramfuseError("node config needs model-path and data-path (or a simulation with run config workspace)")
    owners = sorted(p for p in Path(str(workspace)).iterdir() if (p / "model").is_dir())
    index = int(node["partition-id"])
    if index >= len(owners):
        raise GramfuseError(f"simulated node {index} has no owner folder in {workspace} ({len(owners)} owners)")
    return owners[index] / "model", owners[index] / "data.jsonl"


def adapter_base(context: Context) -> Path | None:
    """The base model of a site whose model is a LoRA adapter folder, where the node config overrides it."""
    base = context.node_config.get("base-path")
    return Path(str(base)) if base else None


def data_settings(context: Context) -> DataSettings:
    node = context.node_config
    max_examples = node.get("max-examples")
    return DataSettings(
        max_length=int(node.get("max-length", 128)),
        batch_size=int(node.get("batch-size", 32)),
        max_examples=int(max_examples) if max_examples else None,
        text_field=str(node["text-field"]) if node.get("text-field") else None,
        label_field=str(node["label-field"]) if node.get("label-field") else None,
        task=str(node["task"]) if node.get("task") else None,
        pair_field=str(node.get("pair-field", "text_pair")),
    )


def site_privacy(context: Context) -> tuple[PrivacySpec | None, PrivacyBudget | None]:
    """The site's differential-privacy request and budget record, from its node config (none where it is off).

    Where the node config says nothing of DP the run config's ``dp-*`` keys apply (a simulation's sites have no
    node config of their own); a site that sets ``dp-epsilon``, even to 0, decides for itself."""
    stray = sorted(key for key in ("dp-delta", "dp-clip", "dp-budget", "dp-budget-path") if key in context.node_config)
    if stray and "dp-epsilon" not in context.node_config and float(context.run_config.get("dp-epsilon", 0.0)) <= 0.0:
        # An operator who set a clip or a budget meant DP on; releasing exact statistics instead would be silent.
        raise PrivacyError(f"node config sets {', '.join(stray)} but not dp-epsilon: set dp-epsilon to turn "
                           "differential privacy on (or dp-epsilon=0 to release exact statistics knowingly)")
    node = context.node_config if "dp-epsilon" in context.node_config else context.run_config
    epsilon = float(node.get("dp-epsilon", 0.0))
    if epsilon <= 0.0:
        return None, None
    delta = float(node.get("dp-delta", 0.0))
    spec = PrivacySpec(epsilon, delta if delta > 0.0 else None, float(node.get("dp-clip", 1.0)))
    return spec, site_budget(context, epsilon)


def site_budget(context: Context, epsilon: float) -> PrivacyBudget:
    """The data's budget record (node config ``dp-budget-path``, else beside the data file) and its limit:
    ``dp-budget`` (where the node config sets ``dp-epsilon`` its own, else the run config's), or that ``dp-epsilon``,
    or ``epsilon``."""
    node = context.node_config if "dp-epsilon" in context.node_config else context.run_config
    path = context.node_config.get("dp-budget-path") or node.get("dp-budget-path")
    data_file = site_paths(context)[1]  # the budget is the data's: every model folder over it spends from it
    limit = float(node.get("dp-budget", 0.0)) or float(node.get("dp-epsilon", 0.0)) or epsilon
    return PrivacyBudget(Path(str(path)) if path else budget_path(data_file), limit)


def distributed_request(context: Context, request) -> dict | None:
    """The run's distributed DP noise (:class:`fusion.privacy.NoiseShares`, request key ``dp-distributed``); None
    where the run has none. Checked against the site's own guarantee once its example count is known
    (:func:`check_guarantee`)."""
    raw = request.get("dp-distributed")
    if not raw:
        return None
    public = json.loads(str(raw))
    if not isinstance(public, dict) or public.get("mechanism") != DISTRIBUTED_MECHANISM:
        raise PrivacyError(f"the run asks for distributed DP noise by a mechanism this site does not know: {raw}",
                           public="distributed DP noise of an unknown mechanism")
    return public


def check_guarantee(context: Context, public: dict, example_count: int) -> None:
    """Refuse a run whose guarantee is weaker than the one this site's node config asks for: its ``dp-epsilon``,
    and its ``dp-delta`` or, where it sets none but sets ``dp-epsilon``, the ``1 / N^2`` a local release would
    have. (A delta above ``1 / N`` is refused whatever the node config says.)"""
    node = context.node_config
    PrivacySpec(public["epsilon"], public["delta"], public["clip"]).delta_for(example_count)
    own_epsilon = float(node.get("dp-epsilon", 0.0))
    own_delta = float(node.get("dp-delta", 0.0)) or (1.0 / max(example_count, 2) ** 2 if own_epsilon > 0.0 else 0.0)
    weaker = [f"epsilon {public['epsilon']:g} > {own_epsilon:g}" for _ in [0] if 0.0 < own_epsilon < public["epsilon"]]
    weaker += [f"delta {public['delta']:g} > {own_delta:.3g}" for _ in [0] if 0.0 < own_delta < public["delta"]]
    if weaker:
        # The server reads which bound, never the site's own value: 1/N^2 would give away its example count.
        raise PrivacyError(f"the run's DP guarantee is weaker than this site's node config asks ({', '.join(weaker)})",
                           public="the run's DP guarantee is weaker than this site's node config asks (its "
                                  f"{' and '.join(item.split()[0] for item in weaker)})")


def noise_shares(public: dict, methods, layout, session: OwnerSession | None) -> NoiseShares:
    """This site's share of the run's noise. Before the shares are exchanged (the keys step) there is no threshold
    and no agreed layout yet, and only the layout of what would be sent is used: a placeholder share then."""
    if session is None or "threshold" not in session.state:
        return NoiseShares(public["epsilon"], public["delta"], public["clip"], public["weight_bound"], threshold=1)
    releases = len(noised_units(methods, layout, float(public["weight_bound"])))
    return NoiseShares(public["epsilon"], public["delta"], public["clip"], public["weight_bound"],
                       threshold=int(session.state["threshold"]), releases=max(releases, 1),
                       seed=int(session.state[NOISE_SEED]))


def site_statistics(model_dir: Path, data_file: Path, settings: DataSettings, fisher: bool, base: Path | None = None,
                    privacy: tuple[PrivacySpec | None, PrivacyBudget | None] = (None, None), draw_noise: bool = True):
    """The model and its statistics: the site's statistics file when it fits, else freshly computed. Under DP, a
    file drawn with the same request fits, and the draw is charged to the budget once, before anything is sent;
    ``draw_noise=False``: clipped statistics, for noise added to each release (distributed noise)."""
    spec, budget = privacy
    model, stats = _fitting_statistics(model_dir, data_file, settings, fisher, base, spec, budget, draw_noise)
    if budget is not None and stats.privacy:
        spent = budget.spend(stats.privacy)
        log.info("differentially private statistics: epsilon %.3g spent in all of this site's budget %.3g", spent,
                 budget.epsilon_budget)
    return model, stats


def _fitting_statistics(model_dir, data_file, settings, fisher, base, spec, budget, draw_noise):
    model, _ = load_model(model_dir, settings.task, base=base)
    # Clipped statistics (distributed noise) live beside the site's noisy file, never over it: that file stays the
    # one local-noise runs reuse for free, and no exact Grams sit under the name an offline merge reads.
    stats_file = model_dir / (STATS_FILENAME if spec is None or draw_noise else CLIPPED_STATS_FILENAME)
    if stats_file.is_file():
        try:
            stats = load_statistics(stats_file)
        except StatisticsError as error:
            log.warning("%s; computing the statistics again", error)
        else:
            fits = (
                stats.fingerprint == checkpoint_files(model_dir, base).fingerprint()
                and stats.settings == expected_settings(settings, spec, draw_noise)
                and (spec is None or (stats.noise_std > 0.0) == draw_noise)  # clipped only: not yet a release
                and (stats.fisher is not None or not fisher)
            )
            if fits:
                log.info("reusing %s", stats_file)
                return model, stats
    stats, _ = compute_statistics(model_dir, data_file, settings=settings, fisher=fisher, progress=False, model=model,
                                  base=base, privacy=spec, budget=budget, draw_noise=draw_noise, out=stats_file)
    return model, stats


@app.query()
@private_errors
def describe(msg: Message, context: Context) -> Message:
    """A few bytes that let the server find misfits before any site sends its statistics."""
    model_dir, _ = site_paths(context)
    model, _ = load_model(model_dir, data_settings(context).task, base=adapter_base(context))
    return Message(content=RecordDict({META: ConfigRecord({"json": json.dumps(describe_model(model))})}), reply_to=msg)


def refuse_plaintext(context: Context) -> None:
    """A site that requires secure mode, or one taking part in a secure run, sends nothing in the clear: a
    plaintext request then (a server mixing modes to read what the masks hide) is refused."""
    if bool(context.node_config.get("require-secure", False)):
        reason = ("this site requires secure mode (node config require-secure): it refuses a plaintext request for "
                  "its weights and statistics")
        raise GramfuseError(reason, public=reason)
    if SECURE_STATE in context.state:
        reason = ("this site is in a secure run: it refuses a plaintext request for its weights and statistics in "
                  "the same run")
        raise GramfuseError(reason, public=reason)


@app.train()
@private_errors
def contribute(msg: Message, context: Context) -> Message:
    """Reply to the server's request with this site's weights and statistics (or weights alone for averaging)."""
    refuse_plaintext(context)
    started = time.perf_counter()
    request = msg.content["config"]
    needs_statistics = bool(request.get("needs-statistics", True))
    needs_fisher = bool(request.get("needs-fisher", False))
    model_dir, data_file = site_paths(context)
    if needs_statistics:
        model, stats = site_statistics(model_dir, data_file, data_settings(context), needs_fisher,
                                       adapter_base(context), site_privacy(context))
    else:
        model, stats = load_model(model_dir, data_settings(context).task, base=adapter_base(context))[0], None
    part = Part.from_config(request)  # the server may ask for a few layers at a time (and first for the layout)
    tensors, meta = owner_payload(model, stats, fisher=needs_fisher, part=part)
    files = {}
    if part is None or part.layout:
        # The tokenizer is the public pretrained one; the server needs it, once, to write loadable folders.
        files = {TOKENIZER + name: data for name, data in tokenizer_files(model_dir, adapter_base(context)).items()}
        # An adapter site says which weights are its base's: a server holding that base will not ask for them.
        meta["adapter"] = untouched_by_adapter(model, checkpoint_files(model_dir, adapter_base(context)))
        # An owner withdrawing from the merge (node config leave=true): a server keeping sums subtracts it.
        meta["leave"] = bool(context.node_config.get("leave", False))
    meta["site"] = str(context.node_config.get("name", model_dir.parent.name if model_dir.name == "model"
                                                 else model_dir.name))
    meta["site_seconds"] = round(time.perf_counter() - started, 3)
    content = RecordDict({PAYLOAD: ArrayRecord(torch_state_dict=tensors), META: ConfigRecord({"json": json.dumps(meta), **files})})
    return Message(content=content, reply_to=msg)



# --- secure mode: the same contribution, computed here and sent only masked (see fusion.secure) ---------------------



def ledger(context: Context) -> Ledger:
    """This site's ledger of secure releases: node config ``ledger-path``, or a file in its model folder."""
    path = context.node_config.get("ledger-path")
    return Ledger(Path(str(path)) if path else site_paths(context)[0] / LEDGER_FILENAME)


def _session(context: Context) -> OwnerSession:
    if SECURE_STATE not in context.state:
        raise GramfuseError("no secure session on this node for this run (keys were never exchanged)")
    return OwnerSession(dict(context.state[SECURE_STATE]))


def _save_session(context: Context, session: OwnerSession) -> None:
    context.state[SECURE_STATE] = ConfigRecord(session.state)


def _site_contribution(context: Context, request, session: OwnerSession | None = None,
                       part: list | None = None) -> tuple:
    """This site's model, its owner, its contribution to the sums of the requested methods (with its share of the
    run's distributed DP noise, if any: then also the noised tensors' public bounds), and whether it has the head.

    The contribution comes in chunks, formed as they are read: a group of layers at a time (one Gram and the layers
    it feeds, or one averaged tensor), so that the site never holds the whole model's float64 ``G W^T`` (some 60 GB
    for a 7B model); with ``part`` (a sums round's share of the layout), one chunk of that part's sums."""
    methods = [method_from_spec(spec) for spec in str(request["method"]).split(",") if spec.strip()]
    needs_fisher = any(method.needs_fisher for method in methods)
    model_dir, data_file = site_paths(context)
    distributed = distributed_request(context, request)
    if session is not None and session.state.get(NOISE_REQUEST) != (
            None if distributed is None else json.dumps(distributed, sort_keys=True)):
        # The noise the keys were sent for holds for the whole run: neither dropped nor changed halfway.
        raise SecureProtocolError("the run's distributed DP noise is not the one this site's keys were sent for: it "
                                  "does not send its sums")
    if distributed is None:
        privacy = site_privacy(context)
    else:  # clipped statistics, noised afresh in every run (each run is a release, charged before the sums leave)
        privacy = (PrivacySpec(distributed["epsilon"], distributed["delta"], distributed["clip"]), None)
    model, stats = site_statistics(model_dir, data_file, data_settings(context), needs_fisher, adapter_base(context),
                                   privacy, draw_noise=distributed is None)
    owner = owner_update("site", model, stats)
    reference = json.loads(str(request["reference-label-set"]))
    with_head = [list(item) for item in owner.label_set] == reference
    noise, bounds = None, {}
    if distributed is not None:
        check_guarantee(context, distributed, stats.example_count)
        layout = [(key, tuple(shape)) for key, shape in json.loads(str(request.get("layout", "[]")))]
        noise = noise_shares(distributed, methods, layout, session)
        bounds = public_bounds(noised_units(methods, layout, noise.weight_bound), noise, stats.example_count)
    if part is None:
        modules = stats.modules if stats is not None else {}
        chunks = [group.keys for group in plan_groups(list(owner.params), set(owner.head), modules)]
    else:
        chunks = [{key.split("/", 3)[3] for key, _ in part if key.count("/") >= 3}]
    wanted = None if part is None else {key for key, _ in part}
    contribution = (in_part(secure_contributions(methods, owner, with_head, noise, names), wanted) for names in chunks)
    return model, owner, contribution, with_head, noise, bounds


def in_part(contribution: dict, wanted: set[str] | None) -> dict:
    return contribution if wanted is None else {key: value for key, value in contribution.items() if key in wanted}


def _shares_head(context: Context, with_head: bool) -> bool:
    """Only a head that is not summed with others' (another label set), and only if the site's operator says so."""
    return bool(context.node_config.get("share-head", False)) and not with_head


def _reply(msg: Message, **records) -> Message:
    return Message(content=RecordDict(records), reply_to=msg)


@app.query("secure_keys")
@private_errors
def secure_keys(msg: Message, context: Context) -> Message:
    """Fresh keys for this run, and what the server must know to route and merge: the layout of the sums (names
    and shapes, no values), the layer map, the config and label set, the public tokenizer."""
    if context.node_config.get("leave", False):
        # Secure mode keeps no sums to subtract from: a removal is the others' next run without this site, so a site
        # that has withdrawn takes part in none (and its statistics are not even loaded).
        raise SecureProtocolError(f"{WITHDRAWN}: it takes part in no secure run; its removal is the other sites' "
                                  "next run without it")
    request = msg.content["config"]
    model, owner, chunks, with_head, noise, _ = _site_contribution(context, request)
    shapes = {key: tuple(value.shape) for chunk in chunks for key, value in chunk.items()}
    session = OwnerSession.begin(str(request["session"]), context.node_id)
    session.state[CONTRIBUTION] = contribution_of(owner.statistics.fingerprint, owner.statistics.settings)
    if noise is not None:
        session.state[NOISE_SEED] = secrets.randbits(63)  # this run's noise: the same in each of its rounds
        session.state[NOISE_DRAW] = secrets.token_hex(16)
        session.state[NOISE_REQUEST] = json.dumps(distributed_request(context, request), sort_keys=True)
        site_budget(context, noise.epsilon).check(noise.spending(noise_draw(session)))  # refused before any share
    _save_session(context, session)
    model_dir, _ = site_paths(context)
    meta = {
        "layout": [(key, shapes[key]) for key in sorted(shapes)],
        "modules": {name: asdict(info) for name, info in owner.statistics.modules.items()},
        "gram_dtype": owner.statistics.gram_dtype,
        "config": public_config_json(owner.config),
        "label_set": [list(item) for item in owner.label_set],
        "site": str(context.node_config.get("name", model_dir.parent.name if model_dir.name == "model"
                                            else model_dir.name)),
        "adapter": untouched_by_adapter(model, checkpoint_files(model_dir, adapter_base(context))),
    }  # no timings: how long the statistics took would tell the server how much data the site holds
    files = {TOKENIZER + name: data for name, data in tokenizer_files(model_dir, adapter_base(context)).items()}
    keys = {f"key/{purpose}": value for purpose, value in session.public_keys().items()}
    return _reply(msg, **{META: ConfigRecord({"json": json.dumps(meta), **keys, **files})})


@app.query("secure_shares")
@private_errors
def secure_shares(msg: Message, context: Context) -> Message:
    request = msg.content["config"]
    roster = {int(node): {purpose: bytes.fromhex(key) for purpose, key in keys.items()}
              for node, keys in json.loads(str(request["roster"])).items()}
    session = _session(context)
    # Before any share leaves: a roster a few sites apart from an earlier release of the same contribution is refused.
    ledger(context).check(str(session.state[CONTRIBUTION]), roster, int(context.node_config.get(
        "min-roster-difference", MIN_DIFFERENCE)))
    sealed, commitments, round_keys = session.share(roster, int(request["threshold"]),
                                                    json.loads(str(request.get("rounds", "null"))))
    _save_session(context, session)
    content = {f"share/{node}": data for node, data in sealed.items()}
    content.update({f"commitment/{name}": value for name, value in commitments.items()})
    content.update({f"key/{name}": value for name, value in round_keys.items()})
    return _reply(msg, **{META: ConfigRecord(content)})


@app.train("secure_masked")
@private_errors
def secure_masked(msg: Message, context: Context) -> Message:
    """One masked round: ``bounds`` (the magnitude band of every tensor) or ``sums`` (the fixed-point tensors)."""
    request = msg.content["config"]
    session = _session(context)
    round_name = str(request["round"])
    # Each round is answered once per run, refused or not: retried with other scales, a refusal would bound the
    # site's statistics a little more each time.
    if f"asked/{round_name}" in session.state:
        raise SecureProtocolError(f"round {round_name!r} was already asked of this site in this run: it is not "
                                  "answered twice")
    session.state[f"asked/{round_name}"] = 1
    _save_session(context, session)
    incoming = {int(key[len("share/"):]): bytes(value) for key, value in request.items() if key.startswith("share/")}
    if incoming:
        round_keys = {int(node): {r: bytes.fromhex(key) for r, key in keys.items()}
                      for node, keys in json.loads(str(request.get("round-keys", "{}"))).items()}
        session.receive_shares(incoming, round_keys)
    layout = [(key, tuple(shape)) for key, shape in json.loads(str(request["layout"]))]
    hold_layout(session, round_name, layout)
    participants = [int(node) for node in json.loads(str(request["participants"]))]
    session.check_order(round_name, participants)  # before anything of the data is looked at
    part = None if round_name == BOUNDS else released_part(session, layout, request)
    _save_session(context, session)  # a sum asked once is never asked again, sent or refused
    _, owner, chunks, with_head, noise, bounds = _site_contribution(context, request, session, part)
    if part is None:  # the noised tensors' public bounds stand for their magnitudes
        magnitudes = {}
        vectors = band_vectors(layout, chain(observed(chunks, magnitudes), [bounds]))
        session.state[MAGNITUDES] = json.dumps(magnitudes)
        masked_layout = bands_layout(layout)
    else:
        scales = held_scales(session, round_name, layout, part, request)
        if round_name == sums_round(1):  # every part encodes under the scales, or the site drops out now
            check_encodable(json.loads(str(session.state.get(MAGNITUDES, "{}"))), scales, len(participants))
        contribution = {key: value for chunk in chunks for key, value in chunk.items()}
        missing = [key for key, _ in part if f"/{BODY}" in key and key not in contribution]
        if missing:  # every site has every body sum of the agreed layout: zeros would single out the others
            raise SecureProtocolError(f"sum {missing[0]!r} of the agreed layout is not one this site forms: it is not "
                                      "sent")
        vectors, masked_layout = encoded_vectors(part, contribution, scales, len(participants)), part
    masked = session.mask(round_name, participants, masked_layout, vectors, request_digest(request))
    first_part = round_name == sums_round(1)
    if noise is not None and first_part:  # the release begins, encoded and masked: charged before it leaves
        spent = site_budget(context, noise.epsilon).spend(noise.spending(noise_draw(session)))
        log.info("distributed DP noise (share 1/%d): epsilon %.3g spent in all of this site's budget",
                 noise.threshold, spent)
    _save_session(context, session)
    records = {MASKED: ArrayRecord({key: Array(value) for key, value in masked.items()})}
    if first_part and _shares_head(context, with_head):  # the site decides, whatever the server asks
        records[OWN_HEAD] = ArrayRecord(torch_state_dict={n: wire_tensor(v) for n, v in owner.split()[1].items()})
    return _reply(msg, **records)


def held_scales(session: OwnerSession, round_name: str, layout: list, part: list, request) -> dict[str, int]:
    """The fixed-point scales, all of them with the first part (checked against this site's magnitudes there) and
    held for the run: a later part asking a tighter scale of this site alone could probe its magnitudes."""
    scales = {str(key): int(bits) for key, bits in json.loads(str(request["scales"])).items()}
    if round_name == sums_round(1):
        missing = [key for key, _ in layout if key not in scales]
        if missing:
            raise SecureProtocolError(f"the first part carries no scale for sum {missing[0]!r}: it is not answered")
        session.state[SCALES] = json.dumps(scales)
    held = json.loads(str(session.state.get(SCALES, "{}")))
    if any(held.get(key) != scales.get(key) for key, _ in part):
        raise SecureProtocolError(f"round {round_name!r}: the scales are not those of the first part: it is not "
                                  "answered")
    return held


def hold_layout(session: OwnerSession, round_name: str, layout: list) -> None:
    """The layout of the bounds round holds for the run: the noise is calibrated on it and every part is drawn
    from it, so a server that changed it later could shrink the noise or ask sums outside it."""
    digest = hashlib.sha256(json.dumps(layout).encode()).hexdigest()
    if round_name == BOUNDS:
        session.state[AGREED_LAYOUT] = digest
    elif session.state.get(AGREED_LAYOUT) != digest:
        raise SecureProtocolError(f"round {round_name!r}: the layout is not the one of the bounds round: it is not "
                                  "answered")


def observed(chunks, magnitudes: dict):
    """``chunks`` as they come, each sum's largest magnitude noted in ``magnitudes``."""
    for chunk in chunks:
        magnitudes.update({key: float(value.abs().max()) if value.numel() else 0.0 for key, value in chunk.items()})
        yield chunk


def released_part(session: OwnerSession, layout: list, request) -> list:
    """The part of the agreed ``layout`` a sums round asks for, each of its sums released once in the run: asked
    again in another part, with other participants, two sums would tell the difference between them."""
    asked = [str(key) for key in json.loads(str(request["part"]))]
    shapes = dict(layout)
    unknown = [key for key in asked if key not in shapes]
    released = set(json.loads(str(session.state.get(RELEASED, "[]"))))
    again = [key for key in asked if key in released]
    if unknown or again or len(set(asked)) != len(asked):
        raise SecureProtocolError(f"sum {(unknown or again or asked)[0]!r} is not in the agreed layout, or is asked "
                                  "twice in this run: it is not sent")
    session.state[RELEASED] = json.dumps(sorted(released | set(asked)))
    return [(key, shapes[key]) for key in asked]


@app.query("secure_unmask")
@private_errors
def secure_unmask(msg: Message, context: Context) -> Message:
    request = msg.content["config"]
    session = _session(context)
    survivors = json.loads(str(request["survivors"]))
    revealed = session.reveal(str(request["round"]), survivors, json.loads(str(request["dropped"])))
    _save_session(context, session)
    if str(request["round"]) == sums_round(1):  # the release begins: the survivors' sums, this site's among them
        ledger(context).record(str(session.state[CONTRIBUTION]), survivors, session.session)
    return _reply(msg, **{META: ConfigRecord({f"share/{owner}": share for owner, share in revealed.items()})})
