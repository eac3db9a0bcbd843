"""The aggregation ServerApp. Run config (pyproject.toml ``[tool.flwr.app.config]``, or ``flwr run -c``):

- ``method`` (regmean), ``alpha`` (1.0), ``weighting`` (sum), ``scaling``/``density`` (task-arithmetic, ties; a
  negative value keeps the method's default), ``base-path`` (the pretrained model, for those two);
- ``out-dir``: where the merged model(s), ``gramfuse-merge.json`` and ``report.json`` go;
- ``min-owners`` (2): fewer merged owners is a failed run that writes nothing;
- ``timeout`` (600 s): for sites to connect and for their replies;
- ``heads`` (auto): ``auto`` merges heads when all owners share a label set, else keeps each owner's own;
  ``shared`` rejects an owner whose label set differs from the first.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fusion.methods import get_method, option_names
from fusion.merge import load_base
from server.strategy import RegMeanStrategy

app = ServerApp()


def show_progress() -> None:
    """Per-owner log lines from our loggers only (the root logger would also print every HTTP request)."""
    logger = logging.getLogger("gramfuse")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s gramfuse: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def method_from(run_config) -> object:
    name = str(run_config.get("method", "regmean"))
    options = {}
    for option in option_names(name):
        value = run_config.get(option)
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0):
            continue  # absent, or the "use the method's default" marker
        options[option] = value
    return get_method(name, **options)


@app.main()
def main(grid: Grid, context: Context) -> None:
    show_progress()
    config = context.run_config
    method = method_from(config)
    base = load_base(str(config["base-path"])) if method.needs_base and config.get("base-path") else None
    strategy = RegMeanStrategy(
        method,
        str(config.get("out-dir", "runs/federated")),
        min_owners=int(config.get("min-owners", 2)),
        timeout=float(config.get("timeout", 600)),
        heads=str(config.get("heads", "auto")),
        base=base,
    )
    strategy.run(grid)
