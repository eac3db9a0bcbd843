"""The ``gramfuse`` command: ``stats``, ``merge``, ``evaluate``, ``report`` (forgetting), and ``credentials`` for a
secure deployment.

Errors caused by input go to stderr as one line ``gramfuse: error: ...`` with exit status 1; usage errors exit 2
(argparse's convention).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import re
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from .checkpoint import DEFAULT_SHARD_BYTES
from .errors import GramfuseError
from .methods import METHODS, get_method, option_names

# CLI flag -> method option; a flag given to a method that has no such option is an error, not silently ignored.
METHOD_FLAGS = ("alpha", "weighting", "tied", "scaling", "density", "lines_alpha", "lines_beta")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _byte_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if match is None or match.group(2) not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size such as 500MB or 2GB: {text!r}")
    value = int(float(match.group(1)) * SIZE_UNITS[match.group(2)])
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least one byte, not {text!r}")
    return value


def _data_flags(parser: argparse.ArgumentParser) -> None:
    _reading_flags(parser)
    _task_flag(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _reading_flags(parser: Any) -> None:
    parser.add_argument("--max-length", type=_positive_int, default=128, help="tokens per example (default 128)")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="examples per batch (default 32)")
    parser.add_argument("--max-examples", type=_positive_int, default=None, help="use at most N examples")
    parser.add_argument("--text-field", help="name of the text field or column (default: text; tokens for "
                        "token classification, a list of words)")
    parser.add_argument("--label-field", help="name of the label field or column (default: label; tags for token "
                        "classification, one per word; a causal LM needs none)")
    parser.add_argument("--pair-field", default="text_pair", help="sequence classification of sentence pairs: the "
                        "second text's field (default text_pair; used where the rows have it)")


def _task_flag(parser: argparse.ArgumentParser) -> None:
    from .tasks import TASKS

    parser.add_argument("--task", choices=sorted(TASKS), help="the model's task (default: from config.json's "
                        "architectures). " + "; ".join(f"{name}: {task.summary}" for name, task in TASKS.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gramfuse",
        description="Merge fine-tuned copies of one transformer with RegMean and its baselines, from statistics.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stats = commands.add_parser(
        "stats",
        help="compute a model's Gram statistics over a data file",
        description="Compute the Gram statistics of every linear layer's inputs over a data file (JSONL or CSV with "
        "text,label) and write them as a safetensors statistics file, by default into the model folder.",
    )
    stats.add_argument("model_dir", metavar="MODEL_DIR")
    stats.add_argument("data_file", metavar="DATA_FILE")
    stats.add_argument("-o", "--output", metavar="STATS_FILE", help="default: MODEL_DIR/gramfuse-stats.safetensors")
    stats.add_argument("--fisher", action="store_true", help="also gather the diagonal Fisher (needs labels)")
    stats.add_argument("--gram-dtype", choices=("float64", "float32"), default="float64",
                       help="dtype of the per-batch Gram products: float64 (exact, default) or float32 (faster); "
                       "sums are float64 either way")
    stats.add_argument("--device", default="auto", help="auto (a GPU when there is one, default), cpu, cuda, cuda:N")
    stats.add_argument("--base", metavar="BASE_DIR", help="a LoRA adapter's base model folder (default: the one its "
                       "adapter_config.json names)")
    private = stats.add_argument_group(
        "differential privacy", "clip each example's share of the Grams and add Gaussian noise (Analyze Gauss), so "
        "that the Grams and everything computed from them are (epsilon, delta)-DP for each example of the data, against "
        "its replacement (the example count is public; the weights are not covered)")
    private.add_argument("--dp-epsilon", type=float, metavar="EPSILON", help="turn DP on at this epsilon")
    private.add_argument("--dp-delta", type=float, metavar="DELTA", help="default: 1 / N^2 for N examples")
    private.add_argument("--dp-clip", type=float, metavar="TOKENS", help="an example counts as at most this many "
                         "unit-norm token rows in each Gram (default 1: the mean of its tokens)")
    private.add_argument("--dp-budget", type=float, metavar="EPSILON", help="the data's total epsilon over every "
                         "noise draw, composed (default, or 0: --dp-epsilon, one draw); a draw past it is refused and "
                         "nothing is written")
    private.add_argument("--dp-budget-path", type=Path, metavar="PATH", help="the data's budget record (default: "
                         "DATA_FILE.gramfuse-dp-budget.json, the one a federation site over that file spends from)")
    _data_flags(stats)

    merge = commands.add_parser(
        "merge",
        help="merge model folders using their statistics files",
        description="Merge the owners' model folders into OUT_DIR. Owners sharing a label set give one model; "
        "otherwise OUT_DIR holds one folder per owner with the merged body and the owner's own head.",
    )
    merge.add_argument("model_dirs", nargs="*", metavar="MODEL_DIR")
    merge.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    merge.add_argument("--save-sums", metavar="SUMS_DIR", help="also write the aggregation's sums with a ledger of "
                       "the owners, to add or remove owners later (--sums); owners must share a label set")
    merge.add_argument("--sums", metavar="SUMS_DIR", help="merge the owners inside SUMS_DIR (written by "
                       "--save-sums) instead of MODEL_DIRs, with --add and --remove; equals merging the resulting "
                       "owners from scratch")
    merge.add_argument("--add", action="extend", nargs="+", default=[], metavar="MODEL_DIR",
                       help="with --sums: owners to add (their folders and statistics files)")
    merge.add_argument("--remove", action="extend", nargs="+", default=[], metavar="MODEL_DIR",
                       help="with --sums: owners to take out, exactly (their folders and statistics files, as merged)")
    merge.add_argument("--method", default="regmean", choices=sorted(METHODS), help="merge method (default regmean)")
    merge.add_argument("--alpha", type=float, help="regmean: non-diagonal scale in [0, 1] (default 1.0)")
    merge.add_argument("--weighting", choices=("sum", "equal"), help="regmean, fisher: sum (default) or equal")
    merge.add_argument("--tied", choices=("head", "embedding"), help="regmean: a tensor tied between the input "
                       "embeddings and the LM head is solved as the head (default) or averaged as an embedding")
    merge.add_argument("--scaling", type=float, help="task-arithmetic, ties: lambda on the merged task vector")
    merge.add_argument("--lines-beta", type=float, help="task-arithmetic, ties: LiNeS, the task vector of block l "
                       "of L scaled by scaling + lines_beta (l - 1) / (L - 1) (default 0: one scaling); regmean: "
                       "by lines_alpha + lines_beta (l - 1) / (L - 1), its task vector being merged minus --base")
    merge.add_argument("--lines-alpha", type=float, help="regmean: LiNeS's scale of the shallowest block and of "
                       "everything outside the blocks (default 1: with --lines-beta 0, plain RegMean)")
    merge.add_argument("--density", type=float, help="ties: fraction of each task vector kept, "
                       "max(1, int(density * n)) entries exactly (default 0.2)")
    merge.add_argument("--base", metavar="BASE_DIR", help="the pretrained model (task-arithmetic, ties, --lora-rank); "
                       "also the base of owners that are LoRA adapter folders (default: the one each names)")
    merge.add_argument("--lora-rank", type=_positive_int, metavar="R", help="also write OUT_DIR/lora, a rank-R LoRA "
                       "adapter of the merge against the base (truncated SVD), with its error per layer in the report")
    merge.add_argument("--max-shard-size", type=_byte_size, default=DEFAULT_SHARD_BYTES, metavar="SIZE",
                       help="largest output shard, e.g. 500MB or 2GB (default 5GB, as save_pretrained); a larger "
                       "model is written as several shards with an index")
    _task_flag(merge)
    merge.add_argument("--device", default="auto", help="where the Gram products and solves run: auto (a GPU when "
                       "there is one, default), cpu, cuda, cuda:N")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    merge.add_argument("--quiet", action="store_true", help="no progress bars")
    plusplus = merge.add_argument_group("regmean++", "the owners' data, read in this process: its Grams are taken "
                                        "through the merge as it is built, unit by unit")
    plusplus.add_argument("--data", nargs="+", default=[], metavar="DATA_FILE",
                          help="one data file per MODEL_DIR, in the same order")
    _reading_flags(plusplus)

    evaluate = commands.add_parser(
        "evaluate",
        help="score a model on a labelled data file, as its task is scored",
        description="Score a model on a data file: accuracy and macro-F1 for classes, Pearson and Spearman for a "
        "regression label (num_labels 1), entity-level F1 for token classification, perplexity for a causal LM.",
    )
    evaluate.add_argument("model_dir", metavar="MODEL_DIR")
    evaluate.add_argument("data_file", metavar="DATA_FILE")
    evaluate.add_argument("--json", action="store_true", help="print the scores as JSON")
    evaluate.add_argument("--base", metavar="BASE_DIR", help="a LoRA adapter's base model folder")
    _data_flags(evaluate)

    report = commands.add_parser(
        "report",
        help="the forgetting report: what a merge keeps of each owner, on the owner's held-out data",
        description="For each --owner MODEL_DIR DATA_FILE: the merged model's score on the owner's data against the "
        "owner's own model's (retention: 1.0 keeps all; for perplexity the owner's over the merged's), and linear "
        "CKA of their hidden states layer by layer. An owner with a head of its own is compared with "
        "MERGED_DIR/<owner>.",
    )
    report.add_argument("merged_dir", metavar="MERGED_DIR")
    report.add_argument("--owner", nargs=2, action="append", required=True, metavar=("MODEL_DIR", "DATA_FILE"),
                        help="an owner's model folder and its held-out data (repeat per owner)")
    report.add_argument("-o", "--output", metavar="REPORT_JSON", help="write the report as JSON (default: print it)")
    report.add_argument("--chart", metavar="PNG", help="also draw retention and CKA per layer (needs matplotlib)")
    report.add_argument("--base", metavar="BASE_DIR", help="the base of owners that are LoRA adapter folders")
    _data_flags(report)

    credentials = commands.add_parser(
        "credentials",
        help="TLS certificates for the SuperLink and authentication keys for sites",
        description="Write a CA and a SuperLink TLS certificate (--host, repeatable) and/or one OpenSSH ECDSA P-384 "
        "key pair per site (--site, repeatable) for Flower's SuperNode authentication, into OUT_DIR.",
    )
    credentials.add_argument("out_dir", metavar="OUT_DIR")
    credentials.add_argument("--host", action="append", default=[], help="a name or address the SuperLink is "
                             "reached at (its certificate covers each)")
    credentials.add_argument("--site", action="append", default=[], help="a site to make a key pair for")
    credentials.add_argument("--overwrite", action="store_true", help="replace keys and certificates that exist "
                             "(certificates signed by an old CA, and registered old site keys, stop working)")
    return parser


def _settings(args: argparse.Namespace):
    from .workflows import DataSettings

    return DataSettings(args.max_length, args.batch_size, args.max_examples, args.text_field, args.label_field,
                        args.task, args.pair_field)


def run_stats(args: argparse.Namespace) -> None:
    from .budget import PrivacyBudget, budget_path
    from .privacy import PrivacyError, PrivacySpec
    from .workflows import compute_statistics

    privacy, budget = None, None
    if args.dp_epsilon is not None:
        privacy = PrivacySpec(args.dp_epsilon, args.dp_delta, 1.0 if args.dp_clip is None else args.dp_clip)
        budget = PrivacyBudget(args.dp_budget_path or budget_path(args.data_file),
                               args.dp_budget or args.dp_epsilon)  # 0, as in the node config: one draw
    elif any(value is not None for value in (args.dp_delta, args.dp_clip, args.dp_budget, args.dp_budget_path)):
        raise PrivacyError("--dp-delta, --dp-clip or --dp-budget without --dp-epsilon: give the epsilon to turn "
                           "differential privacy on")
    stats, path = compute_statistics(
        args.model_dir, args.data_file, settings=_settings(args), fisher=args.fisher, gram_dtype=args.gram_dtype,
        out=args.output, progress=not args.quiet, device=args.device, base=args.base, privacy=privacy, budget=budget,
    )
    # Under DP the token counts are withheld (the file holds the example count in their place)
    tokens = "token counts withheld" if stats.privacy else f"{max(stats.token_counts.values(), default=0)} tokens"
    print(f"{path}: {stats.example_count} examples, {tokens}, {len(stats.modules)} layers, {len(stats.grams)} Grams")
    if stats.privacy:
        release = stats.privacy
        print(f"differentially private: ({release['epsilon']:g}, {release['delta']:.3g})-DP, noise multiplier "
              f"{release['noise_multiplier']:.3g} over {release['grams']} Grams (noise std {release['noise_std']:.3g} "
              f"per entry); here only: {stats.clipped_examples / stats.example_count:.0%} of examples clipped to "
              f"{release['clip']:g} token(s)")
        print(f"the data's budget ({budget.path}): epsilon {budget.spent():.3g} spent of {budget.epsilon_budget:g}")


def run_merge(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .merge import merge_folders, merge_from_sums

    given = {flag: getattr(args, flag) for flag in METHOD_FLAGS if getattr(args, flag) is not None}
    valid = option_names(args.method)
    for flag in given:
        if flag not in valid:
            raise GramfuseError(f"--{flag} does not apply to method {args.method!r} (its options: {valid or 'none'})")
    method = get_method(args.method, **given)
    with tqdm(desc=f"merging ({args.method})", unit="group", disable=args.quiet) as bar:
        if args.sums:
            report = merge_from_sums(args.sums, args.output, method, add=args.add, remove=args.remove,
                                     save_sums=args.save_sums, base_dir=args.base, overwrite=args.overwrite,
                                     progress=bar, max_shard_bytes=args.max_shard_size, device=args.device)
        else:
            report = merge_folders(args.model_dirs, args.output, method, base_dir=args.base, overwrite=args.overwrite,
                                   progress=bar, max_shard_bytes=args.max_shard_size, device=args.device,
                                   task=args.task, lora_rank=args.lora_rank, save_sums=args.save_sums,
                                   data=args.data, data_settings=_settings(args))
    print(merge_summary(args.output, report))


def check_merge_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Owners come from MODEL_DIRs or from --sums (with --add/--remove), never both: usage errors, exit 2."""
    if args.sums and args.model_dirs:
        parser.error("merge: give owners either as MODEL_DIRs or inside --sums (add more with --add), not both")
    if not args.sums and (args.add or args.remove):
        parser.error("merge: --add and --remove change the owners inside --sums SUMS_DIR; give --sums")
    if not args.sums and not args.model_dirs:
        parser.error("merge: give MODEL_DIRs to merge, or --sums SUMS_DIR")
    if args.sums and (args.lora_rank or args.task or args.data):
        parser.error("merge: --lora-rank, --task and --data are not available with --sums")


def merge_summary(out_dir: str, report: dict) -> str:
    layers = report["layers"].values()
    summary = f"{out_dir}: merged {len(report['owners'])} owners with {report['method']}"
    changed = report.get("sums", {})
    for step in ("added", "removed"):
        if changed.get(step):
            summary += f" ({step} {', '.join(changed[step])})"
    if changed.get("saved"):
        summary += f"; sums saved in {changed['saved']}"
    finite = [layer["condition"] for layer in layers if layer["condition"] != "inf"]
    if finite:
        summary += f"; {len(report['layers'])} Grams solved, worst condition {max(finite):.3g}"
    regularised = sum(layer["solver"] != "cholesky" for layer in layers)
    if regularised:
        summary += f", {regularised} regularised towards the average"
    if not report["shared_label_set"]:
        summary += f"; label sets differ: one folder per owner ({', '.join(report['outputs'])})"
    return summary


def run_evaluate(args: argparse.Namespace) -> None:
    from .workflows import evaluate_folder

    scores = evaluate_folder(args.model_dir, args.data_file, settings=_settings(args), progress=not args.quiet,
                             base=args.base)
    if args.json:
        print(json.dumps(scores))
    else:
        print("  ".join(f"{key.replace('_', '-')} {value:.4f}" for key, value in scores.items()
                        if isinstance(value, float)) + f"  ({scores['examples']} examples)")


def run_report(args: argparse.Namespace) -> None:
    from .forgetting import forgetting_chart
    from .workflows import forgetting_report

    report = forgetting_report(args.merged_dir, [tuple(pair) for pair in args.owner], settings=_settings(args),
                               progress=not args.quiet, base=args.base)
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text)
    if args.chart:
        forgetting_chart(report, args.chart)
    for owner in report["owners"]:
        print(f"{owner['owner']}: {owner['score']} {owner['merged']:.4g} merged, {owner['own']:.4g} own, retention "
              f"{owner['retention']:.3f}; CKA first/last layer {owner['cka'][0]:.3f}/{owner['cka'][-1]:.3f}",
              file=sys.stderr if not args.output else sys.stdout)
    if not args.output:
        print(text)


def run_credentials(args: argparse.Namespace) -> None:
    # Transport credentials are the federation's business; the command lives here so that one `gramfuse` does all.
    from federation.credentials import make_site_key, make_tls

    if not args.host and not args.site:
        raise GramfuseError("nothing to make: give --host (TLS certificates) and/or --site (site keys)")
    out = Path(args.out_dir)
    written = make_tls(out, args.host, args.overwrite) if args.host else []
    for site in args.site:
        written += make_site_key(out, site, args.overwrite)
    print("\n".join(str(path) for path in written))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "merge":
        check_merge_arguments(parser, args)
    logging.basicConfig(level=logging.WARNING, format="gramfuse: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        {"stats": run_stats, "merge": run_merge, "evaluate": run_evaluate, "report": run_report,
         "credentials": run_credentials}[args.command](args)
    except GramfuseError as error:
        print(f"gramfuse: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gramfuse: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # a full disk, a folder we may not write: outputs are written aside, then moved in
        where = f"{error.filename}: " if error.filename else ""
        reason = "no space left on the device" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        print(f"gramfuse: error: {where}{reason}; no output was left half-written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
