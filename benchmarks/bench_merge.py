"""Peak memory and time of `gramfuse merge --method regmean`, against the model's depth, the number of owners, and a
floor measured in the same run.

    python -m benchmarks.bench_merge [--llm] [--workdir runs/bench-merge]

- depth: two owners of a 512-wide BERT classifier with 4 and with 16 layers; the peak RSS ratio should stay near 1
  (the merge streams group by group);
- owners: 2 and 8 owners of the 4-layer model; flat too;
- the plaintext server in a federated round of the same owners (Flower's simulation engine, part-mb 256, less than
  the 16-layer model's sums): the same two ratios, from the server's own report; ``--servers secure`` (or ``both``):
  the secure server's (one masked round per part);
- floor: reading every owner's tensors once plus one Cholesky factorisation and triangular solve per Gram group, in
  this process; the merge's own time (its report's ``seconds``) is given as a ratio to it;
- ``--llm``: a Llama-7B-width classifier (hidden 4096, intermediate 11008, 2 layers, bf16, random weights) of two
  owners, statistics on 48 real texts: peak RSS, seconds per layer, and the projection to 32 layers.

Each merge runs in its own process, which reports its own peak RSS (:mod:`benchmarks.peak`). Statistics are computed on real VADER
snippets with the bundled MiniLM tokenizer. Writes benchmarks/results/merge.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import peak, write_results
from examples.assets import minilm_dir, vader, write_jsonl
from fusion.checkpoint import load_tokenizer
from fusion.lazy import CheckpointFiles
from fusion.statistics import STATS_FILENAME, load_statistics, open_statistics
from fusion.workflows import DataSettings, compute_statistics

RESULTS = Path(__file__).parent / "results" / "merge.json"
SERVER_PART_MB = 256  # smaller than the 16-layer model's sums (about 1.7 GB), as any part is for a large model
SETTINGS = DataSettings(max_length=32, batch_size=16, max_examples=48)


def bert_config(layers: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=512, num_hidden_layers=layers, num_attention_heads=8,
                      intermediate_size=2048, max_position_embeddings=128, num_labels=2)


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=30522, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=128, num_labels=2,
                       pad_token_id=0, dtype="bfloat16")


def make_owners(root: Path, config, count: int, data: Path, tokenizer_dir: Path, dtype=torch.float32,
                device: str = "cpu") -> tuple[list[Path], float]:
    """``count`` owners: one random model, each owner a perturbed copy, saved with the tokenizer and statistics.
    Also the seconds the statistics took (all owners), on ``device``."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(config).to(dtype)
    tokenizer = load_tokenizer(tokenizer_dir)
    folders, seconds = [], 0.0
    for index in range(count):
        folder = root / f"owner{index}"
        if not (folder / STATS_FILENAME).is_file():
            generator = torch.Generator().manual_seed(100 + index)
            owner = AutoModelForSequenceClassification.from_config(config).to(dtype)
            with torch.no_grad():
                for mine, theirs in zip(owner.parameters(), base.parameters()):
                    mine.copy_(theirs + 0.01 * torch.randn(theirs.shape, generator=generator).to(dtype))
            owner.save_pretrained(str(folder))
            tokenizer.save_pretrained(str(folder))
            del owner
            started = time.perf_counter()
            compute_statistics(folder, data, settings=SETTINGS, progress=False, device=device)
            seconds += time.perf_counter() - started
        folders.append(folder)
    return folders, seconds


def merge_in_process(folders: list[Path], out: Path, device: str = "cpu") -> dict:
    """`gramfuse merge` in a process of its own: its report, its own peak RSS (:mod:`benchmarks.peak`)."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "benchmarks.peak", "fusion.cli", "merge", *map(str, folders), "-o", str(out),
               "--quiet", "--device", device]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"merge failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads((out / "gramfuse-merge.json").read_text())
    return {"owners": len(folders), "peak_rss_mb": peak.parse(done.stderr), "wall_seconds": round(wall, 2),
            "merge_seconds": report["seconds"], "layers": report["layers"], "summary": done.stdout.strip()}


def server_through_flower(folders: list[Path], workdir: Path, data: Path, secure: bool = False) -> dict:
    """A federated round (plaintext, or ``secure``) over these owners on Flower's simulation engine (our own
    SuperLink): the server's peak RSS as its report gives it."""
    from server.processes import Loopback

    workdir = workdir.resolve()  # Flower runs the apps in folders of their own
    shutil.rmtree(workdir, ignore_errors=True)
    workspace = workdir / "workspace"
    for index, folder in enumerate(folders):
        (workspace / f"owner{index}").mkdir(parents=True)
        (workspace / f"owner{index}" / "model").symlink_to(folder.resolve())
        (workspace / f"owner{index}" / "data.jsonl").symlink_to(data.resolve())
    out = workdir / "out"
    simulation = Loopback(workdir / "flower", simulation=True)
    try:
        simulation.start_superlink()
        done = simulation.run(f"workspace='{workspace}' out-dir='{out}' min-owners={len(folders)} timeout=1200 "
                              f"part-mb={SERVER_PART_MB} secure={str(secure).lower()}", num_supernodes=len(folders),
                              timeout=3600)
    finally:
        simulation.stop()
    if not (out / "report.json").is_file():
        raise SystemExit(f"the federated round failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    federation = json.loads((out / "report.json").read_text())["federation"]
    sent = max(owner["bytes_received"] for owner in federation["owners"].values())
    return {"owners": len(folders), "server_peak_rss_mb": federation["server_peak_rss_mb"],
            "parts": federation["timings"].get("parts", 1), "seconds": federation["timings"]["total_seconds"],
            "bytes_per_owner": sent, "bytes_to_weights_plus_packed_grams": round(sent / payload_floor(folders[0]), 3)}


def payload_floor(folder: Path) -> int:
    """An owner's weights in their own dtype plus its packed float64 Gram triangles: what it must send at least."""
    files = CheckpointFiles(folder)
    weights = sum(math.prod(files.shape(n)) * files.dtype(n).itemsize for n in files if files.is_float(n))
    stats = open_statistics(folder / STATS_FILENAME)
    return weights + sum(8 * dim * (dim + 1) // 2 for dim in stats.dims.values())


def floor_seconds(folders: list[Path], device: str = "cpu") -> float:
    """Reading every owner's tensors once, plus one Cholesky and triangular solve per Gram group (on ``device``)."""
    started = time.perf_counter()
    for folder in folders:
        files = CheckpointFiles(folder)
        for name in files:
            files[name]
    stats = load_statistics(folders[0] / STATS_FILENAME)
    widths: dict[str, int] = {}
    for module, info in stats.modules.items():
        widths[info.gram] = widths.get(info.gram, 0) + CheckpointFiles(folders[0]).shape(info.weight)[0]
    for key, width in widths.items():
        gram = (stats.full_gram(key) + torch.eye(stats.dims[key], dtype=torch.float64)).to(device)
        factor = torch.linalg.cholesky(gram)
        float(torch.cholesky_solve(torch.ones(stats.dims[key], width, dtype=torch.float64, device=device), factor)[0, 0])
    return time.perf_counter() - started


def run(name: str, folders: list[Path], workdir: Path) -> dict:
    result = merge_in_process(folders, workdir / f"merged-{name}")
    result["floor_seconds"] = round(floor_seconds(folders), 2)
    result["merge_to_floor"] = round(result["merge_seconds"] / result["floor_seconds"], 3)
    print(f"{name}: peak {result['peak_rss_mb']} MB, merge {result['merge_seconds']} s, "
          f"floor {result['floor_seconds']} s", flush=True)
    result.pop("layers")
    return result


def llm(workdir: Path, data: Path, tokenizer_dir: Path, devices: list[str]) -> dict:
    """The Llama-7B-width merge, its statistics and its merge timed on each of ``devices``."""
    results = {}
    for device in devices:
        folders, stats_seconds = make_owners(workdir / f"llama-7b-width-2-{device}", llama_config(2), 2, data,
                                             tokenizer_dir, torch.bfloat16, device)
        result = merge_in_process(folders, workdir / f"merged-llama-{device}", device)
        per_layer = {}
        for layer in result.pop("layers").values():
            index = next((part for part in layer["modules"][0].split(".") if part.isdigit()), None)
            if index is not None:
                per_layer[index] = per_layer.get(index, 0.0) + layer["seconds"]
        layer_seconds = sum(per_layer.values()) / max(len(per_layer), 1)
        result["statistics_seconds_two_owners"] = round(stats_seconds, 2)
        result["seconds_per_layer"] = round(layer_seconds, 2)
        result["projected_32_layer_seconds"] = round(result["merge_seconds"] + 30 * layer_seconds, 1)
        result["floor_seconds"] = round(floor_seconds(folders, device), 2)
        result["merge_to_floor"] = round(result["merge_seconds"] / result["floor_seconds"], 3)
        print(f"llama 7B width on {device}: {result}", flush=True)
        results[device] = result
    return results


def servers(mode: str, shallow: list[Path], deep: list[Path], workdir: Path, data: Path) -> dict:
    """The federated server's peak RSS against depth and owners, in ``mode`` (plaintext or secure)."""
    secure = mode == "secure"
    rounds = {
        "4 layers, 2 owners": server_through_flower(shallow[:2], workdir / f"{mode}-server-4", data, secure),
        "16 layers, 2 owners": server_through_flower(deep, workdir / f"{mode}-server-16", data, secure),
        "4 layers, 8 owners": server_through_flower(shallow, workdir / f"{mode}-server-8", data, secure),
    }
    prefix = "secure_server" if secure else "server"
    peak_of = {name: entry["server_peak_rss_mb"] for name, entry in rounds.items()}
    return {
        prefix: rounds,
        f"{prefix}_peak_rss_ratio_16_to_4_layers": round(peak_of["16 layers, 2 owners"] / peak_of["4 layers, 2 owners"],
                                                         3),
        f"{prefix}_peak_rss_ratio_8_to_2_owners": round(peak_of["4 layers, 8 owners"] / peak_of["4 layers, 2 owners"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", action="store_true", help="also the Llama-7B-width merge (minutes, ~10 GB)")
    parser.add_argument("--no-bert", action="store_true", help="skip the depth and owner-count runs")
    parser.add_argument("--servers", choices=["plaintext", "secure", "both", "none"], default="plaintext",
                        help="which federated servers to measure (secure: minutes per round)")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline merges (servers only)")
    parser.add_argument("--devices", nargs="+", default=["cpu"], help="devices for the --llm runs (cpu, cuda)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer folder (default: bundled MiniLM)")
    parser.add_argument("--data", type=Path, default=None, help="a JSONL data file (default: VADER amazon)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-merge"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = args.tokenizer or minilm_dir()
    data = args.data or write_jsonl(vader("amazon")[:SETTINGS.max_examples], args.workdir / "data.jsonl")
    result = {}
    if not args.no_bert:
        shallow, _ = make_owners(args.workdir / "bert-4", bert_config(4), 8, data, tokenizer_dir)
        deep, _ = make_owners(args.workdir / "bert-16", bert_config(16), 2, data, tokenizer_dir)
        if not args.no_offline:
            runs = {
                "4 layers, 2 owners": run("4 layers, 2 owners", shallow[:2], args.workdir),
                "16 layers, 2 owners": run("16 layers, 2 owners", deep, args.workdir),
                "4 layers, 8 owners": run("4 layers, 8 owners", shallow, args.workdir),
            }
            result = {
                "runs": runs,
                "peak_rss_ratio_16_to_4_layers": round(runs["16 layers, 2 owners"]["peak_rss_mb"]
                                                      / runs["4 layers, 2 owners"]["peak_rss_mb"], 3),
                "peak_rss_ratio_8_to_2_owners": round(runs["4 layers, 8 owners"]["peak_rss_mb"]
                                                     / runs["4 layers, 2 owners"]["peak_rss_mb"], 3),
            }
        modes = {"plaintext": ["plaintext"], "secure": ["secure"], "both": ["plaintext", "secure"], "none": []}
        for mode in modes[args.servers]:
            result.update(servers(mode, shallow, deep, args.workdir, data))
    if args.llm:
        result["llama_7b_width"] = llm(args.workdir, data, tokenizer_dir, args.devices)
    write_results(args.results, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
