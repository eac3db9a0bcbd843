"""The strategy's checks that need no site: what it refuses before any site is asked for anything."""

import pytest

from fusion.errors import GramfuseError
from fusion.methods import get_method
from server.secure import SecureRegMeanStrategy
from server.strategy import RegMeanStrategy


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
