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
