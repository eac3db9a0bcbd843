"""Statistics collection against a plain forward pass and against the naive approach, on the bundled MiniLM.

    python -m benchmarks.bench_stats [--examples 256] [--batch-size 32] [--max-length 128] [--repeats 3]

Naive = what the RegMean reference code does: a full float32 X^T X per linear module, pads counted, shared inputs
recomputed for every module that reads them. All timings are medians over repeats, reported as ratios to a plain
forward pass over the same pre-tokenised batches measured in the same run (these machines are noisy).
Writes benchmarks/results/stats.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from examples.assets import minilm_dir, split, vader
from fusion.checkpoint import load_tokenizer
from fusion.gram import collect_statistics, linear_modules
from fusion.statistics import save_statistics

RESULTS = Path(__file__).parent / "results" / "stats.json"


def naive_statistics(model, batches) -> dict[str, torch.Tensor]:
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def accumulate(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            product = x.T @ x
            grams[name] = grams[name] + product if name in grams else product

        return accumulate

    handles = [m.register_forward_pre_hook(hook(n)) for n, m, _ in linear_modules(model)]
    try:
        forward(model, batches)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def forward(model, batches) -> None:
    with torch.no_grad():
        for batch in batches:
            model(**batch)


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_stats", description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=2).eval()
    tokenizer = load_tokenizer(minilm_dir())
    rows, _ = split(vader("movies"), seed=0, train=args.examples, test=0)
    texts = [row["text"] for row in rows]
    batches = [
        dict(tokenizer(texts[i : i + args.batch_size], padding=True, truncation=True, max_length=args.max_length,
                       return_tensors="pt"))
        for i in range(0, len(texts), args.batch_size)
    ]
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    all_positions = sum(b["attention_mask"].numel() for b in batches)

    forward(model, batches[:1])  # warm-up
    seconds = {
        "forward": timed(lambda: forward(model, batches), args.repeats),
        "gramfuse_float64": timed(lambda: collect_statistics(model, batches), args.repeats),
        "gramfuse_float32": timed(lambda: collect_statistics(model, batches, compute_dtype=torch.float32),
                                  args.repeats),
        "naive_float32": timed(lambda: naive_statistics(model, batches), args.repeats),
    }
    with tempfile.TemporaryDirectory() as folder:
        ours = save_statistics(collect_statistics(model, batches), Path(folder) / "ours.safetensors")
        naive_path = Path(folder) / "naive.safetensors"
        save_file({k: v.contiguous() for k, v in naive_statistics(model, batches).items()}, str(naive_path))
        sizes = {"gramfuse": ours.stat().st_size, "naive_float32_full": naive_path.stat().st_size}

    forward_s = seconds["forward"]
    result = {
        "model": "all-MiniLM-L6-v2 (bundled)",
        "examples": len(texts),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "real_tokens": real_tokens,
        "padded_positions": all_positions,
        "repeats": args.repeats,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "time_over_forward": {k: round(v / forward_s, 3) for k, v in seconds.items()},
        "gram_work_over_forward": {k: round((v - forward_s) / forward_s, 3) for k, v in seconds.items()
                                   if k != "forward"},
        "file_bytes": sizes,
        "file_bytes_over_naive": round(sizes["gramfuse"] / sizes["naive_float32_full"], 3),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
