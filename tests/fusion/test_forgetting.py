"""The forgetting report: linear CKA against the kernel (HSIC) formula, retention's orientation, and the command on
tiny models (a model against itself keeps everything; against another, less)."""

import json
import math

import pytest
import torch
from helpers import perturbed, save_owner, tiny_causal_lm, tiny_model, write_data
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.cli import main as gramfuse
from fusion.forgetting import linear_cka, retention


def cka_by_kernels(first: torch.Tensor, second: torch.Tensor) -> float:
    """CKA as Kornblith et al. define it: HSIC of the linear kernels, centred with H = I - 11^T/n."""
    n = first.shape[0]
    centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = first.double() @ first.double().T, second.double() @ second.double().T
    hsic = lambda a, b: torch.trace(a @ centre @ b @ centre)  # noqa: E731
    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 20), p=st.integers(1, 8), q=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_linear_cka_equals_the_kernel_formula_and_keeps_its_invariances(n, p, q, seed):
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(n, p, generator=generator, dtype=torch.float64)
    second = torch.randn(n, q, generator=generator, dtype=torch.float64)
    value = linear_cka(first, second)
    assert math.isclose(value, cka_by_kernels(first, second), rel_tol=1e-9, abs_tol=1e-12)
    assert -1e-12 <= value <= 1 + 1e-12
    rotation, _ = torch.linalg.qr(torch.randn(p, p, generator=generator, dtype=torch.float64))
    assert math.isclose(linear_cka(first @ rotation * 3.0 + 5.0, second), value, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(linear_cka(first, first), 1.0, rel_tol=1e-12)


def test_retention_is_oriented_so_that_one_keeps_everything():
    assert retention({"accuracy": 0.8}, {"accuracy": 0.9, "examples": 10})["retention"] == pytest.approx(0.8 / 0.9)
    ppl = retention({"perplexity": 20.0, "accuracy": 0.1}, {"perplexity": 10.0})  # lower is better
    assert ppl["score"] == "perplexity" and ppl["retention"] == pytest.approx(0.5)
    assert math.isnan(retention({"accuracy": 0.5}, {"accuracy": 0.0})["retention"])  # no ratio to an own score of 0


@pytest.mark.parametrize("kind", ["classifier", "causal-lm"])
def test_the_report_of_a_model_against_itself_keeps_everything_and_against_another_less(tmp_path, kind):
    if kind == "classifier":
        base = tiny_model("bert")
        own, other = perturbed(base, seed=1), perturbed(base, seed=2, scale=0.5)
    else:
        base = tiny_causal_lm()
        own, other = perturbed(base, seed=1), perturbed(base, seed=2, scale=0.5)
    own_dir, other_dir = save_owner(own, tmp_path / "own"), save_owner(other, tmp_path / "other")
    data = write_data(tmp_path / "held-out.jsonl", 24, seed=3)
    assert gramfuse(["report", str(own_dir), "--owner", str(own_dir), str(data), "-o", str(tmp_path / "self.json"),
                     "--chart", str(tmp_path / "self.png"), "--quiet"]) == 0
    itself = json.loads((tmp_path / "self.json").read_text())["owners"][0]
    assert itself["retention"] == pytest.approx(1.0) and all(c == pytest.approx(1.0) for c in itself["cka"])
    assert (tmp_path / "self.png").stat().st_size > 1000
    assert len(itself["cka"]) == own.config.num_hidden_layers + 1  # the embeddings, then every block
    assert gramfuse(["report", str(other_dir), "--owner", str(own_dir), str(data), "-o", str(tmp_path / "o.json"),
                     "--quiet"]) == 0
    against = json.loads((tmp_path / "o.json").read_text())["owners"][0]
    assert against["score"] == ("accuracy" if kind == "classifier" else "perplexity")
    assert against["own"] == itself["own"] and min(against["cka"][1:]) < 0.999
