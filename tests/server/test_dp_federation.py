"""Differential privacy through Flower: the sites draw noisy statistics once (run config dp-*, as a simulation's
sites have no node config), a plaintext and then a secure run over them both equal the offline merge of the same
drawn files, and the second run spends no more of any site's budget."""

import json

import pytest
from helpers import assert_same_tensors, perturbed, save_owner, simulate, tiny_model, write_data
from safetensors.torch import load_file

from fusion.cli import main as gramfuse
from fusion.privacy import MECHANISM
from fusion.statistics import load_statistics

OWNERS = 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    base = tiny_model("bert")
    for i in range(OWNERS):
        save_owner(perturbed(base, seed=60 + i), root / "workspace" / f"owner{i}" / "model")
        write_data(root / "workspace" / f"owner{i}" / "data.jsonl", 30, seed=i)
    return root


def budgets(workspace):
    return [json.loads((workspace / f"owner{i}" / "data.jsonl.gramfuse-dp-budget.json").read_text())
            for i in range(OWNERS)]


@pytest.mark.parametrize("mode", ["plaintext", "secure"])  # in this order: the secure run reuses the draws
def test_dp_federation_equals_the_offline_merge_of_the_drawn_statistics(workspace, mode):
    root, sites = workspace, workspace / "workspace"
    secure = "secure=true" if mode == "secure" else ""
    report = simulate(root / mode, sites, f"method='regmean' dp-epsilon=2.0 dp-clip=2.0 {secure}", OWNERS)
    models = [str(sites / f"owner{i}" / "model") for i in range(OWNERS)]
    for model in models:
        stats = load_statistics(f"{model}/gramfuse-stats.safetensors")
        assert stats.settings["privacy"] == {"epsilon": 2.0, "delta": None, "clip": 2.0, "mechanism": MECHANISM}
        assert stats.privacy["delta"] == 1 / 30 ** 2
    spent = budgets(sites)
    assert [len(draws) for draws in spent] == [1] * OWNERS  # one draw per site, however many runs
    assert drawn_once_each(spent)
    offline = root / f"offline-{mode}"
    assert gramfuse(["merge", *models, "-o", str(offline), "--quiet"]) == 0
    assert_same_tensors(load_file(str(root / mode / "out" / "model.safetensors")),
                        load_file(str(offline / "model.safetensors")), mode)
    layers = report["layers"]
    if mode == "plaintext":  # the server saw each site's release; in secure mode only the summed noise
        assert sorted(o["privacy"]["epsilon"] for o in report["federation"]["owners"].values()) == [2.0] * OWNERS
    offline_layers = json.loads((offline / "gramfuse-merge.json").read_text())["layers"]
    for key, entry in offline_layers.items():
        assert entry["solver"] == "cholesky+noise-ridge"
        assert layers[key]["noise_std"] == pytest.approx(entry["noise_std"], rel=1e-6)  # secure: summed, masked


def drawn_once_each(spent) -> bool:
    draws = [draws[0]["draw"] for draws in spent]
    return len(set(draws)) == OWNERS and all(d[0]["epsilon"] == 2.0 for d in spent)



def test_secure_mode_names_a_site_whose_privacy_differs_from_the_reference():
    """In secure mode the server sees layouts only: a DP site sums its noise's variance, an exact one does not."""
    from server.secure import SecureRegMeanStrategy

    exact = {"0/body/gram/g": (10,), "0/body/owners": ()}
    private = {**exact, "0/body/noise-variance/g": ()}
    assert "its statistics are differentially private" in SecureRegMeanStrategy._layout_misfit(exact, private, False)
    assert "the reference statistics are" in SecureRegMeanStrategy._layout_misfit(private, exact, False)
    assert SecureRegMeanStrategy._layout_misfit(private, dict(private), False) is None
    # DP adapter sites that adapted different layers differ in which noise keys they hold, not in being private
    other_adapter = {"0/body/gram/h": (10,), "0/body/owners": (), "0/body/noise-variance/h": ()}
    assert SecureRegMeanStrategy._layout_misfit(private, other_adapter, True) is None
    assert "differentially private" in SecureRegMeanStrategy._layout_misfit(
        private, {"0/body/gram/h": (10,), "0/body/owners": ()}, True)


DISTRIBUTED_RUN = ("method='regmean' secure=true dp-noise='distributed' dp-epsilon=4.0 dp-delta=1e-4 dp-clip=1.0 "
                   "dp-weight-bound=50.0")


def test_distributed_noise_through_flower_sums_the_whole_noise_and_charges_each_run(tmp_path):
    """A secure run with dp-noise=distributed: each of three sites adds half of the noise (threshold 2), the decoded
    sums carry 3/2 of what (epsilon, delta) needs, in every released tensor; each site's budget is charged once for
    the run, and a second run that would pass a site's budget is refused by every site before any share is sent."""
    from server.processes import Loopback

    from fusion.privacy import DISTRIBUTED, NoiseShares

    sites = tmp_path / "workspace"
    base = tiny_model("bert")
    for i in range(OWNERS):
        save_owner(perturbed(base, seed=80 + i), sites / f"owner{i}" / "model")
        write_data(sites / f"owner{i}" / "data.jsonl", 30, seed=10 + i)
    report = simulate(tmp_path / "first", sites, f"{DISTRIBUTED_RUN} dp-budget=5.0", OWNERS)
    privacy = report["federation"]["privacy"]
    assert privacy["noise"] == DISTRIBUTED and privacy["epsilon"] == 4.0 and privacy["delta"] == 1e-4
    assert report["federation"]["secure"]["threshold"] == 2 and privacy["noise_variance_over_needed"] == 1.5
    for i in range(OWNERS):  # clipped statistics at the sites, in a file of their own; the noise is drawn per run
        assert not (sites / f"owner{i}" / "model" / "gramfuse-stats.safetensors").exists()
        stats = load_statistics(sites / f"owner{i}" / "model" / "gramfuse-stats-clipped.safetensors")
        assert stats.noise_std == 0.0 and stats.privacy["clip"] == 1.0
        assert stats.settings["privacy"] == {"clip": 1.0, "mechanism": MECHANISM, "noise": "none"}  # any epsilon
    assert privacy["releases"] > 0
    whole = NoiseShares(4.0, 1e-4, 1.0, 50.0, threshold=1, releases=privacy["releases"]).std(1.0)
    for key, layer in report["layers"].items():
        assert layer["solver"] == "cholesky+noise-ridge", key
        assert layer["noise_std"] == pytest.approx(whole * 1.5 ** 0.5, rel=1e-6), key
    spent = budgets(sites)
    session = report["federation"]["secure"]["session"]
    assert all(len(draws) == 1 and draws[0]["draw"].startswith(f"secure/{session[:16]}/") for draws in spent)
    assert len({draws[0]["draw"] for draws in spent}) == OWNERS  # each site names its own draw
    assert all(draws[0]["epsilon"] == 4.0 for draws in spent)

    again = Loopback(tmp_path / "again", simulation=True)  # two runs at 4 compose to 6: past a budget of 5
    try:
        again.start_superlink()
        done = again.run(f"workspace='{sites}' out-dir='{tmp_path / 'again' / 'out'}' min-owners={OWNERS} "
                         f"timeout=300 {DISTRIBUTED_RUN} dp-budget=5.0", num_supernodes=OWNERS)
    finally:
        again.stop()
    assert not (tmp_path / "again" / "out").exists()
    assert "would pass the site's DP budget" in done.stdout + done.stderr
    assert [len(draws) for draws in budgets(sites)] == [1] * OWNERS
