"""The server's state between runs, without Flower: versions and the CURRENT pointer, and how sites are sorted
against the sums (joining, leaving, inside, misfits), each refusal with its reason."""

import json

import pytest
from helpers import perturbed, save_owner, tiny_model, write_data

from fusion.cli import main as gramfuse
from fusion.errors import GramfuseError
from fusion.checkpoint import load_model
from fusion.merge import merge_folders
from fusion.methods import get_method
from fusion.statistics import STATS_FILENAME, load_statistics
from fusion.sumsfile import SumsFileError
from federation.payload import Part, owner_payload
from server.state import CURRENT, ServerState, StateKeeper, entry_from_layout


@pytest.fixture(scope="module")
def owners(tmp_path_factory):
    root = tmp_path_factory.mktemp("state-owners")
    base = tiny_model("bert")
    folders = {}
    for i, name in enumerate("abc"):
        folders[name] = save_owner(perturbed(base, seed=80 + i), root / name)
        assert gramfuse(["stats", str(folders[name]), str(write_data(root / f"{name}.jsonl", 16, seed=i)),
                         "--quiet"]) == 0
    return root, folders


def layout_of(folder, **extra):
    """The layout a site of this model folder sends (federation.payload), with ``extra`` fields."""
    model, _ = load_model(folder)
    _, meta = owner_payload(model, load_statistics(folder / STATS_FILENAME), part=Part.LAYOUT)
    return {**json.loads(json.dumps(meta)), **extra}


def stored_state(tmp_path, owners, names):
    _, folders = owners
    state = ServerState(tmp_path / "state")
    state.folder.mkdir()
    version = state.next_version()
    merge_folders([folders[n] for n in names], tmp_path / "merged", get_method("regmean"), save_sums=version)
    state.commit(version)
    return state


def test_versions_count_up_and_current_names_the_last_committed(tmp_path, owners):
    state = stored_state(tmp_path, owners, "ab")
    assert (state.folder / CURRENT).read_text().strip() == "sums-0001"
    assert state.next_version().name == "sums-0002"
    assert [e.name for e in state.current().meta.owners] == ["a", "b"]
    (state.folder / CURRENT).write_text("../elsewhere")
    with pytest.raises(SumsFileError, match="not a version"):
        state.current()


def test_sites_are_sorted_into_joining_leaving_and_inside(tmp_path, owners, caplog):
    _, folders = owners
    stored_state(tmp_path, owners, "ab")
    keeper = StateKeeper(tmp_path / "state", [get_method("regmean")])
    hostile = layout_of(folders["c"])
    hostile["statistics"] = {**hostile["statistics"], "privacy": ["not", "a", "record"]}
    drawn, redrawn = layout_of(folders["c"]), layout_of(folders["c"])  # c's weights and data, two noise draws
    drawn["statistics"] = {**drawn["statistics"], "privacy": {"draw": "one"}}
    redrawn["statistics"] = {**redrawn["statistics"], "privacy": {"draw": "another"}}
    with caplog.at_level("WARNING", logger="gramfuse"):  # both join (another site of one model is possible)...
        assert StateKeeper(tmp_path / "state", [get_method("regmean")]).sort({9: drawn, 10: redrawn}, str) == {}
    assert "owner '10' has the same weights and example count as owner '9'" in caplog.text  # ...named
    # a privacy record that is no mapping names no draw (plausibility rejects it later), and raises nothing here
    assert keeper.sort({8: hostile}, str) == {} and list(keeper.joining) == [8]
    keeper = StateKeeper(tmp_path / "state", [get_method("regmean")])
    alien = layout_of(folders["c"], model_type="gpt2")
    alien["statistics"] = {**alien["statistics"], "example_count": 999}  # another owner, of another architecture
    layouts = {1: layout_of(folders["a"]), 2: layout_of(folders["b"], leave=True), 3: layout_of(folders["c"]),
               5: alien,
               6: {"model_type": "bert"}, 7: layout_of(folders["c"])}
    skipped = keeper.sort(layouts, lambda node: f"site{node}")
    assert skipped[1] == ("inside", "already inside the server's sums as 'a': not asked")
    assert skipped[5][0] == "rejected" and "a gpt2 model, but the sums are of bert models" in skipped[5][1]
    assert skipped[6][0] == "rejected" and "names no statistics" in skipped[6][1]
    assert skipped[7] == ("rejected", "the same weights and statistics as node 3 in this run")  # counted once
    assert list(keeper.leaving) == [2] and keeper.leaving[2].name == "b"
    assert list(keeper.joining) == [3]
    assert [e.name for e in keeper.remaining()] == ["a", "site3"]
    assert entry_from_layout("x", layouts[3], "").identity() == keeper.joining[3].identity()
    alone = StateKeeper(tmp_path / "state", [get_method("regmean")]).sort({4: layout_of(folders["c"], leave=True)}, str)
    assert alone[4] == ("rejected", "asks to leave (leave=true) but is not inside the server's sums")
    # the owner's old site still connected (inside, not asked) next to the one that withdraws it: both fine
    both = StateKeeper(tmp_path / "state", [get_method("regmean")])
    assert both.sort({1: layout_of(folders["a"]), 2: layout_of(folders["a"], leave=True)}, str) == {
        1: ("inside", "already inside the server's sums as 'a': not asked")}
    assert list(both.leaving) == [2]


def test_state_needs_one_set_of_statistics_sums(tmp_path):
    with pytest.raises(GramfuseError, match="one set of sums"):
        StateKeeper(tmp_path / "s", [get_method("regmean"), get_method("average")])
    with pytest.raises(GramfuseError, match="by their statistics"):
        StateKeeper(tmp_path / "s", [get_method("average")])


def test_a_method_that_needs_other_sums_than_the_stored_is_refused(tmp_path, owners):
    stored_state(tmp_path, owners, "ab")
    with pytest.raises(SumsFileError, match="needs other sums"):
        StateKeeper(tmp_path / "state", [get_method("fisher")])
    with pytest.raises(GramfuseError, match="no diag"):  # stored with alpha 1: no diag(G) W^T sums to go on from
        StateKeeper(tmp_path / "state", [get_method("regmean", alpha=0.5)])


def test_a_joining_site_with_a_weight_the_sums_lack_is_a_misfit(tmp_path, owners):
    _, folders = owners
    stored_state(tmp_path, owners, "ab")
    keeper = StateKeeper(tmp_path / "state", [get_method("regmean")])
    layout = layout_of(folders["c"])
    layout["shapes"]["extra.weight"] = [4, 4]
    assert keeper.sort({1: layout}, str)[1] == ("rejected", "against the server's sums: its weights' names differ "
                                                            "from the sums' (has 'extra.weight')")
