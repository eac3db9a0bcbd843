"""The statistics pass on each device, against a plain forward pass on that device in the same run.

    python -m benchmarks.bench_stats_device [--devices cpu cuda] [--examples 256] [--tokenizer DIR] [--data FILE]

A Llama-7B-width classifier (hidden 4096, intermediate 11008, 2 layers, bf16, random weights) over real VADER
snippets (repeated up to ``--examples``), 128 tokens at most. Per device: seconds of a plain forward pass over the
batches, of ``collect_statistics`` with float64 and with float32 Gram products, and their ratios to the forward
pass. Writes benchmarks/results/stats-device.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import write_results
from benchmarks.bench_merge import llama_config
from fusion.checkpoint import load_tokenizer
from fusion.gram import collect_statistics

RESULTS = Path(__file__).parent / "results" / "stats-device.json"


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device) -> float:
    synchronise(device)
    started = time.perf_counter()
    function()
    synchronise(device)
    return time.perf_counter() - started


def measure(device_name: str, texts: list[str], tokenizer, batch_size: int) -> dict:
    from transformers import AutoModelForSequenceClassification

    device = torch.device(device_name)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(llama_config(2)).to(torch.bfloat16).to(device).eval()
    batches = [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=128,
                              return_tensors="pt")) for i in range(0, len(texts), batch_size)]

    def forward():
        with torch.no_grad():
            for batch in batches:
                model(**{k: v.to(device) for k, v in batch.items()})

    forward()  # warm-up: kernels, caches
    result = {"examples": len(texts), "tokens": int(sum(b["attention_mask"].sum() for b in batches))}
    result["forward_seconds"] = round(timed(forward, device), 3)
    for dtype in (torch.float64, torch.float32):
        seconds = timed(lambda: collect_statistics(model, batches, compute_dtype=dtype), device)
        result[f"statistics_{str(dtype)[6:]}_seconds"] = round(seconds, 3)
        result[f"statistics_{str(dtype)[6:]}_to_forward"] = round(seconds / result["forward_seconds"], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_stats_device",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs="+", default=["cpu"])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.tokenizer is None or args.data is None:
        from examples.assets import minilm_dir, vader

        texts = [row["text"] for row in vader("amazon")]
        tokenizer = load_tokenizer(args.tokenizer or minilm_dir())
    else:
        texts = [json.loads(line)["text"] for line in args.data.read_text().splitlines() if line.strip()]
        tokenizer = load_tokenizer(args.tokenizer)
    texts = (texts * (args.examples // len(texts) + 1))[:args.examples]
    result = {device: measure(device, texts, tokenizer, args.batch_size) for device in args.devices}
    write_results(args.results, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
