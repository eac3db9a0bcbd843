"""The aggregation ServerApp. Run config (pyproject.toml ``[tool.flwr.app.config]``, or ``flwr run -c``):

- ``method`` (regmean), or comma-separated specs such as ``regmean:alpha=0.5,average,ties`` to compare several
  methods from one round (one output folder each); ``alpha`` (1.0), ``weighting`` (sum), ``scaling``/``density``
  (task-arithmetic, ties; a negative value keeps the method's default), ``base-path`` (the pretrained model, for
  those two; and where sites are LoRA adapters of it, the source of the weights they left untouched, which then are
  not sent);
- ``out-dir``: where the merged model(s), ``gramfuse-merge.json`` and ``report.json`` go;
- ``min-owners`` (2): fewer merged owners is a failed run that writes nothing;
- ``timeout`` (600 s): for sites to connect and for their replies;
- ``heads`` (auto): ``auto`` merges heads when all owners share a label set, else keeps each owner's own;
  ``shared`` rejects an owner whose label set differs from the first;
- ``secure`` (false): secure aggregation (``server/secure.py``): sites send only masked sums, the server decodes
  only their total; ``secure-threshold`` (0: a majority) sites must survive each masked round; ``secure-bound``
  (65536): no site's tensor may exceed this many times the median site's (a site above it cannot encode and is
  rejected; 0: no bound);
- ``record-dir`` (empty: off): save every reply the server receives, as received, for audits;
- ``state-dir`` (empty: off): plaintext mode keeps its sums there between runs (``server/state.py``): a later run
  asks only the sites not inside yet (added) and those whose node config says ``leave=true`` (subtracted);
- ``dp-noise`` (local): ``distributed`` in secure mode makes every site add ``1 / secure-threshold`` of one noise
  for the run, so the decoded sum carries the whole noise that ``dp-epsilon`` at ``dp-delta`` (both required then,
  the same for every site) needs, rather than each site's own (``fusion.privacy.NoiseShares``); ``dp-clip`` and
  ``dp-weight-bound`` (a public bound on every merged layer's spectral norm, required) calibrate it. Each run is a
  new release, charged to every site's budget;
- ``part-mb`` (2048): the server asks the sites for the model a part at a time, each part's sums on the server
  about this size at most (float64 sums in plaintext mode; in secure mode a masked 64-bit total and its float64
  decoding), so that the server's memory does not grow with the model's depth. In secure mode each part is a
  masked round of its own.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fusion.checkpoint import atomic_folder
from fusion.errors import MergeError
from fusion.finish import method_roots
from fusion.merge import optional_folder
from fusion.methods import get_method, method_from_spec, option_names
from fusion.privacy import DISTRIBUTED
from fusion.secure.fixedpoint import BOUND_FACTOR
from fusion.sumsfile import SumsWriter
from server.secure import SecureRegMeanStrategy
from server.strategy import REPORT_FILE, FederationError, RegMeanStrategy, SiteLost

app = ServerApp()
log = logging.getLogger("gramfuse.server")


def show_progress() -> None:
    """Per-owner log lines from our loggers only (the root logger would also print every HTTP request)."""
    logger = logging.getLogger("gramfuse")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s gramfuse: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def methods_from(run_config) -> list:
    """``method``: one name, its options taken from the run config's keys; or comma-separated specs
    (``regmean:alpha=0.5,average``) to compare several methods from one round."""
    spec = str(run_config.get("method", "regmean"))
    if "," in spec or ":" in spec:
        methods = [method_from_spec(item) for item in spec.split(",") if item.strip()]
    else:
        options = {}
        for option in option_names(spec):
            value = run_config.get(option)
            if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0):
                continue  # absent, or the "use the method's default" marker
            options[option] = value
        methods = [get_method(spec, **options)]
    for method in methods:
        if method.needs_data:  # RegMean++ is offline: a round per unit, only if it pays (README)
            raise MergeError(f"method {method.name!r} needs the owners' data in the merging process; the federation "
                             "does not offer it (run `gramfuse merge --method regmean++ ... --data ...` offline)")
    return methods


def noise_from(run_config) -> dict | None:
    """``dp-noise``: ``local`` (each site's statistics carry all the noise its own request needs) or
    ``distributed`` (secure mode: each site a share of the run's noise, ``dp-epsilon``/``dp-delta``/``dp-clip``
    and ``dp-weight-bound`` set by the run for every site); None for local noise."""
    mode = str(run_config.get("dp-noise", "local"))
    if mode == "local":
        return None
    if mode != DISTRIBUTED:
        raise FederationError(f"dp-noise must be 'local' or '{DISTRIBUTED}', not {mode!r} (central noise at a "
                              "trusted server is not built: SECURITY.md)")
    return {"epsilon": float(run_config.get("dp-epsilon", 0.0)), "delta": float(run_config.get("dp-delta", 0.0)),
            "clip": float(run_config.get("dp-clip", 1.0)), "weight_bound": float(run_config.get("dp-weight-bound", 0.0))}


def workspace_owners(workspace) -> list[str]:
    """The owner folders of a simulation's workspace (``<owner>/model/``), which the simulated nodes take in order."""
    if not workspace or not Path(str(workspace)).is_dir():
        return []
    return sorted(p.name for p in Path(str(workspace)).iterdir() if (p / "model").is_dir())


@app.main()
def main(grid: Grid, context: Context) -> None:
    show_progress()
    config = context.run_config
    methods = methods_from(config)
    options = dict(
        min_owners=int(config.get("min-owners", 2)),
        timeout=float(config.get("timeout", 600)),
        heads=str(config.get("heads", "auto")),
        base_path=str(config.get("base-path", "")) or None,
        record_dir=str(config.get("record-dir", "")) or None,
        inputs=[str(config["workspace"])] if config.get("workspace") else [],
        workspace_owners=workspace_owners(config.get("workspace")),
        state_dir=str(config.get("state-dir", "")) or None,
    )
    out_dir = str(config.get("out-dir", "runs/federated"))
    noise = noise_from(config)
    options["part_bytes"] = int(float(config.get("part-mb", 2048)) * 2**20)
    if bool(config.get("secure", False)):
        strategy = SecureRegMeanStrategy(methods, out_dir, threshold=int(config.get("secure-threshold", 0)),
                                         bound_factor=float(config.get("secure-bound", BOUND_FACTOR)), noise=noise,
                                         **options)
    elif noise:
        raise FederationError(f"dp-noise={DISTRIBUTED} is for secure mode (secure=true): in plaintext mode every "
                              "site's release is its own, with local noise (dp-noise=local)")
    else:
        strategy = RegMeanStrategy(methods, out_dir, **options)
    run(strategy, grid)


def run(strategy: RegMeanStrategy, grid: Grid) -> dict[str, Any]:
    """A federated merge in either mode: the strategy's exchanges before the sums, then the merge; a plaintext site
    lost after part of the merge was formed makes it start again without that site. Returns the report."""
    strategy.begin()
    strategy.prepare(grid)
    while True:
        try:
            return write_merge(strategy, grid)
        except SiteLost as lost:
            strategy.forget(lost.node_id)


def write_merge(strategy: RegMeanStrategy, grid: Grid) -> dict[str, Any]:
    """The one finish of both modes: each part's sums, as the strategy forms them (plaintext: the sites' weights and
    Grams folded; secure: the masked sums decoded), solved and written as it comes, then the own heads, configs,
    tokenizer, reports and ``report.json``; with state-dir, the new version of the kept sums beside them. The output
    folder (and the sums' version) appear whole, or not at all."""
    keeper = strategy.keeper
    version = keeper.state.next_version() if keeper is not None else None
    with atomic_folder(strategy.out_dir, strategy.overwrite, strategy.inputs) as staging, \
            optional_folder(version, False, []) as sums_staging:
        writer = SumsWriter(sums_staging) if sums_staging is not None else None
        finisher = None
        for groups, sums_of in strategy.sums_parts(grid):
            if finisher is None:  # after the first part: the secure owners merged are its survivors
                finisher = strategy.finisher(method_roots(staging, strategy.methods))
            finisher.add(groups, writer.recording(sums_of) if writer is not None else sums_of)
        if finisher is None:
            raise FederationError("the sums came in no part: nothing to merge")
        common = strategy.common_report()
        reports = finisher.close(common)
        for label in reports:
            log.info("merged %d owners with %s", len(common["owners"]), label)
        report = next(iter(reports.values())) if len(reports) == 1 else {"methods": reports}
        report = {**report, "federation": strategy.federation_report()}
        if writer is not None:
            writer.close(*strategy.state_meta())
            report["federation"]["state"] = keeper.report(version)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2))
    if version is not None:  # both folders are whole: only now is the new version the current one
        keeper.state.commit(version)
        log.info("state: %s is current (%d owners inside)", version, len(keeper.remaining()))
    log.info("wrote %s", strategy.out_dir)
    return report
