"""Bytes on the wire for LoRA adapter sites of the real SmolLM2-135M: a simulated plaintext federation of two
adapter owners (rank 8 on the attention's q and v projections, peft's default targets for Llama), with the server
holding the base (``base-path``: the sites send only the layers they adapted) against the same run without it
(every weight travels), measured in one run.

    python -m benchmarks.bench_adapters

Writes benchmarks/results/adapters.json: bytes per site in each run and their ratio, and the two merges' largest
difference (they must be the same model).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from benchmarks import write_results

RESULTS = Path(__file__).parent / "results" / "adapters.json"
DOMAINS = ("news", "science")
TARGETS = ("q_proj", "v_proj")


def adapter_owners(workdir: Path, passages: int) -> Path:
    """A workspace of two LoRA owners of SmolLM2, a few steps each on their domain."""
    from clients.finetune import LanguageModelSettings, finetune_causal_lm
    from examples.assets import smollm2_dir, split, text_domain, write_jsonl

    workspace = workdir / "workspace"
    for seed, domain in enumerate(DOMAINS):
        rows, _ = split(text_domain(domain), seed=0, train=passages, test=0)
        site = workspace / domain
        site.mkdir(parents=True, exist_ok=True)
        train = write_jsonl(rows, site / "data.jsonl")
        if not (site / "model" / "adapter_config.json").is_file():
            settings = LanguageModelSettings(steps=3, batch_size=4, learning_rate=1e-3, seed=seed, lora_rank=8,
                                             lora_targets=TARGETS)
            finetune_causal_lm(smollm2_dir(), train, site / "model", settings, progress=False)
    return workspace


def federate(workdir: Path, workspace: Path, base: Path | None) -> dict:
    from server.processes import Loopback

    out = workdir / ("with-base" if base else "without-base")
    shutil.rmtree(out, ignore_errors=True)
    simulation = Loopback(workdir / f"flower-{out.name}", simulation=True)
    try:
        simulation.start_superlink()
        simulation.run(f"workspace='{workspace}' out-dir='{out}' method='regmean' min-owners={len(DOMAINS)} "
                       "timeout=1800 " + (f"base-path='{base}'" if base else ""),
                       num_supernodes=len(DOMAINS), timeout=2400)
    finally:
        simulation.stop()
    report = json.loads((out / "report.json").read_text())
    return {"out": out, "owners": report["federation"]["owners"]}


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file

    from examples.assets import smollm2_dir

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_adapters", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-adapters"))
    parser.add_argument("--passages", type=int, default=32)
    args = parser.parse_args(argv)
    workspace = adapter_owners(args.workdir.resolve(), args.passages)
    runs = {"with_base": federate(args.workdir.resolve(), workspace, smollm2_dir()),
            "without_base": federate(args.workdir.resolve(), workspace, None)}
    sent = {name: {o["site"]: o["bytes_received"] for o in run["owners"].values()} for name, run in runs.items()}
    merged = {name: load_file(str(run["out"] / "model.safetensors")) for name, run in runs.items()}
    difference = max(float((merged["with_base"][k] - v).abs().max()) for k, v in merged["without_base"].items())
    result = {
        "targets": list(TARGETS), "rank": 8,
        "bytes_per_site": sent,
        "weights_from_base": {o["site"]: o["weights_from_base"] for o in runs["with_base"]["owners"].values()},
        "bytes_ratio_with_base": round(sum(sent["with_base"].values()) / sum(sent["without_base"].values()), 4),
        "largest_difference_between_merges": difference,
        "same_model": difference == 0.0,
    }
    write_results(RESULTS, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
