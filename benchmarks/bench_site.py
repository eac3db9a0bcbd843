"""Site memory of `gramfuse stats`: what the statistics add to the model's own forward pass, against the packed Grams
they release.

    python -m benchmarks.bench_site [--hidden 2048] [--intermediate 5504] [--layers 2] [--workdir runs/bench-site]

A random Llama-shaped classifier (bf16, the given widths), statistics on 48 real VADER texts with the bundled
MiniLM tokenizer. Two processes, each reporting its own peak RSS (:mod:`benchmarks.peak`): the baseline loads the
folder and runs the same batches through the model (no hooks); the other is `gramfuse stats` on the same folder and
data. The figure is ``(stats peak - forward peak) / packed Gram bytes``: 1.0 would be the released triangles and
nothing else; the accumulators' bands hold (b + 1) / (2 b) of each full Gram (``fusion.gram.GramAccumulator``, about
1.12 times the packed size), and the rest is each batch's float64 inputs and products and the allocator's high-water
mark (1.97 measured on the default model, against 2.42 with full accumulators and a whole-file write).
Writes benchmarks/results/site.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import peak, write_results
from examples.assets import minilm_dir, vader, write_jsonl
from fusion.checkpoint import load_model, load_tokenizer
from fusion.statistics import STATS_FILENAME, load_statistics
from fusion.workflows import DataSettings, task_batches

RESULTS = Path(__file__).parent / "results" / "site.json"
SETTINGS = DataSettings(max_length=32, batch_size=16, max_examples=48)


def make_model(folder: Path, hidden: int, intermediate: int, layers: int) -> None:
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    config = LlamaConfig(vocab_size=30522, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                         max_position_embeddings=128, num_labels=2, pad_token_id=0, dtype="bfloat16")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).to(torch.bfloat16).save_pretrained(str(folder))
    load_tokenizer(minilm_dir()).save_pretrained(str(folder))


def forward_only(folder: Path, data: Path) -> None:
    """The baseline: the folder's model over the same batches as the statistics, no hooks."""
    model, _ = load_model(folder)
    with torch.no_grad():
        for batch in task_batches(model, load_tokenizer(folder), data, SETTINGS, False):
            model(**batch)


def peak_of(arguments: list[str]) -> float:
    done = subprocess.run([sys.executable, "-m", "benchmarks.peak", *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{arguments[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return peak.parse(done.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_site", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-site"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--forward-only", nargs=2, type=Path, metavar=("MODEL_DIR", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.forward_only:
        forward_only(*args.forward_only)
        return 0
    folder = args.workdir / f"llama-{args.hidden}-{args.intermediate}-{args.layers}"
    if not (folder / "config.json").is_file():
        make_model(folder, args.hidden, args.intermediate, args.layers)
    data = write_jsonl(vader("amazon")[:SETTINGS.max_examples], args.workdir / "data.jsonl")
    forward_mb = peak_of(["benchmarks.bench_site", "--forward-only", str(folder), str(data)])
    stats_mb = peak_of(["fusion.cli", "stats", str(folder), str(data), "--quiet", "--max-length", "32",
                        "--batch-size", "16", "--max-examples", "48", "--device", "cpu"])
    stats = load_statistics(folder / STATS_FILENAME)
    packed_mb = sum(gram.numel() * gram.element_size() for gram in stats.grams.values()) / 2 ** 20
    full_mb = sum(dim * dim * 8 for dim in stats.dims.values()) / 2 ** 20
    write_results(args.results, {
        "model": f"random Llama classifier, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} "
                 "layers, bf16",
        "grams": len(stats.grams),
        "forward_peak_rss_mb": round(forward_mb, 1),
        "stats_peak_rss_mb": round(stats_mb, 1),
        "packed_grams_mb": round(packed_mb, 1),
        "full_grams_mb": round(full_mb, 1),
        "stats_over_forward_mb": round(stats_mb - forward_mb, 1),
        "added_over_packed_grams": round((stats_mb - forward_mb) / packed_mb, 3),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
