"""The comparison's bookkeeping: summaries over rotations and the table, on hand-made scores."""

from examples.compare import domain_retention_table, retention_by_owner, summarise, table


def scores(**accuracies):
    return {split: {"accuracy": value} for split, value in accuracies.items()}


RUNS = [
    {"held_out": "nyt", "in_domain": ["a", "b"], "scores": {
        "own model (a)": scores(a=0.9, b=0.5, nyt=0.6), "own model (b)": scores(a=0.5, b=0.7, nyt=0.4),
        "regmean": scores(a=0.8, b=0.6, nyt=0.7)}},
    {"held_out": "a", "in_domain": ["b", "nyt"], "scores": {
        "own model (b)": scores(b=0.8, nyt=0.6, a=0.5), "own model (nyt)": scores(b=0.6, nyt=0.8, a=0.3),
        "regmean": scores(b=0.7, nyt=0.7, a=0.5)}},
]


def test_summary_averages_in_domain_and_held_out_over_rotations():
    summary = summarise(RUNS)
    assert abs(summary["regmean"]["in_domain"] - (0.7 + 0.7) / 2) < 1e-12
    assert abs(summary["regmean"]["out_of_domain"] - (0.7 + 0.5) / 2) < 1e-12
    # the own models are pooled: four owners' in-domain means and held-out scores
    assert abs(summary["own model"]["in_domain"] - (0.7 + 0.6 + 0.7 + 0.7) / 4) < 1e-12
    assert abs(summary["own model"]["out_of_domain"] - (0.6 + 0.4 + 0.5 + 0.3) / 4) < 1e-12


def test_table_shows_the_first_run_and_the_rotation_summary():
    text = table(RUNS, summarise(RUNS))
    assert "| regmean | 0.800 | 0.600 | 0.700 | 0.700 | 0.700 |" in text
    assert "Averaged over the rotations" in text
    assert "| regmean | 0.700 | 0.600 |" in text


def test_the_forgetting_report_divides_by_each_owners_own_model_on_its_own_split():
    kept = retention_by_owner(RUNS[0])
    assert set(kept) == {"regmean"}  # the own models are the reference, not candidates
    assert kept["regmean"] == {"a": 0.8 / 0.9, "b": 0.6 / 0.7}  # a's own model on a, b's own model on b
    tasks = {"held_out": None, "in_domain": ["x", "y"], "scores": {
        "own models": scores(x=0.5, y=0.8), "average": scores(x=0.25, y=0.8)}}  # one folder per owner
    assert retention_by_owner(tasks) == {"average": {"x": 0.5, "y": 1.0}}
    text = table(RUNS, summarise(RUNS))
    assert f"| regmean | {0.8 / 0.9:.3f} | {0.6 / 0.7:.3f} | {(0.8 / 0.9 + 0.6 / 0.7) / 2:.3f} | {0.6 / 0.7:.3f} |" in text


def test_the_llm_forgetting_report_takes_the_owners_perplexity_over_the_models():
    scores = {"own model (x)": {"x": 10.0, "y": 40.0}, "own model (y)": {"x": 30.0, "y": 20.0},
              "regmean": {"x": 12.5, "y": 25.0}}
    text = domain_retention_table(["x", "y"], scores)
    assert "| regmean | 0.800 | 0.800 | 0.800 | 0.800 |" in text  # 10 / 12.5 and 20 / 25
    assert "own model" not in text.split("|---")[-1]
    pairs = {"own model (x)": {"x": {"pearson": 0.5}}, "ties": {"x": {"pearson": 0.4}}}  # a score that rises
    assert "| ties | 0.800 | 0.800 | 0.800 |" in domain_retention_table(["x"], pairs)
