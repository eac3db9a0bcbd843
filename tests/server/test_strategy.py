"""The strategy's checks that need no site: what it refuses before any site is asked for anything."""

import json

import pytest

from fusion.errors import GramfuseError
from fusion.methods import get_method
from server.secure import SecureRegMeanStrategy
from server.strategy import FederationError, RegMeanStrategy


@pytest.mark.parametrize("strategy", [RegMeanStrategy, SecureRegMeanStrategy])
def test_an_output_folder_in_the_workspace_or_the_base_is_refused_up_front(tmp_path, strategy):
    (tmp_path / "workspace" / "owner0" / "model").mkdir(parents=True)
    (tmp_path / "base").mkdir()
    for out in (tmp_path / "workspace", tmp_path / "workspace" / "merged", tmp_path / "base", tmp_path):
        server = strategy([get_method("regmean")], out, inputs=[tmp_path / "workspace"], base_path=tmp_path / "base")
        with pytest.raises(GramfuseError, match="apart from the inputs"):
            server.begin()
    assert (tmp_path / "workspace" / "owner0" / "model").is_dir()
    strategy([get_method("regmean")], tmp_path / "out", inputs=[tmp_path / "workspace"]).begin()  # apart: fine


@pytest.mark.parametrize("bound", [0.5, -1.0, float("-inf")])
def test_a_secure_bound_below_one_is_refused_before_any_site_is_asked(tmp_path, bound):
    with pytest.raises(GramfuseError, match="secure-bound: a bound factor must be at least 1"):
        SecureRegMeanStrategy([get_method("regmean")], tmp_path / "out", bound_factor=bound)
    SecureRegMeanStrategy([get_method("regmean")], tmp_path / "out", bound_factor=0)  # 0: no bound


def test_secure_mode_keeps_no_sums_between_runs(tmp_path):
    with pytest.raises(GramfuseError, match="secure mode does not keep sums"):
        SecureRegMeanStrategy([get_method("regmean")], tmp_path / "out", state_dir=tmp_path / "state")


def test_an_output_folder_inside_the_state_dir_is_refused(tmp_path):
    server = RegMeanStrategy([get_method("regmean")], tmp_path / "state" / "out", state_dir=tmp_path / "state")
    with pytest.raises(GramfuseError, match="apart from the inputs"):
        server.begin()


def test_a_method_relative_to_the_base_without_a_base_path_is_refused_up_front(tmp_path):
    with pytest.raises(GramfuseError, match="relative to the base model: set the run config's base-path"):
        RegMeanStrategy([get_method("regmean", lines_alpha=0.5)], tmp_path / "out")
    with pytest.raises(GramfuseError, match="use it in plaintext mode"):  # secure mode: not at all
        SecureRegMeanStrategy([get_method("task-arithmetic")], tmp_path / "out")
    RegMeanStrategy([get_method("regmean", lines_alpha=0.5)], tmp_path / "out", base_path=tmp_path)


NOISE = {"epsilon": 4.0, "delta": 1e-5, "clip": 1.0, "weight_bound": 20.0}


@pytest.mark.parametrize("change, message", [
    ({"delta": 0.0}, "needs dp-delta set for the whole run"),
    ({"weight_bound": 0.0}, "needs dp-weight-bound"),
    ({"epsilon": 0.0}, "epsilon must be between"),
])
def test_distributed_noise_settings_are_checked_before_any_site_is_asked(tmp_path, change, message):
    with pytest.raises(GramfuseError, match=message):
        SecureRegMeanStrategy([get_method("regmean")], tmp_path / "out", noise={**NOISE, **change})


def test_distributed_noise_is_for_methods_that_can_noise_their_sums_in_secure_mode(tmp_path):
    from server.app import noise_from

    for method in (get_method("regmean", weighting="equal"), get_method("fisher")):
        with pytest.raises(GramfuseError, match="cannot add distributed DP noise"):
            SecureRegMeanStrategy([method], tmp_path / "out", noise=NOISE)
    server = SecureRegMeanStrategy([get_method("regmean"), get_method("average")], tmp_path / "out", noise=NOISE)
    assert json.loads(str(server.request()["dp-distributed"]))["weight_bound"] == 20.0
    assert noise_from({"dp-noise": "local"}) is None
    with pytest.raises(GramfuseError, match="central noise at a trusted server is not built"):
        noise_from({"dp-noise": "central"})


def test_summed_bands_that_are_no_histogram_end_the_secure_run(tmp_path):
    """Masks that did not cancel (a site of another version, or garbage) leave band sums near 2^64: named as such,
    rather than a crash deciding the scales."""
    import numpy as np

    strategy = SecureRegMeanStrategy([get_method("regmean")], tmp_path / "out")
    honest = {"0/body/gram/a": np.array([0, 2, 1], dtype=np.uint64)}
    strategy.hold_to_bound(honest, 3)
    garbage = {"0/body/gram/a": np.array([2**63 + 5, 2, 1], dtype=np.uint64)}
    with pytest.raises(FederationError, match="not a histogram of 3 sites: the masks did not cancel"):
        strategy.hold_to_bound(garbage, 3)
    with pytest.raises(FederationError, match="not a histogram of 2 sites"):
        strategy.hold_to_bound(honest, 2)
