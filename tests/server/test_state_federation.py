"""Owners join and leave a real deployment across runs, with the server keeping its sums in state-dir (plaintext).

Run 1 merges sites a and b and keeps the sums. Run 2: site c joins; a and b are still connected but not asked for
any tensor (they are inside); the merge equals `gramfuse merge a b c`. Run 3: b's owner withdraws (a SuperNode with
node config leave=true); its contribution is subtracted, and the merge equals `gramfuse merge a c`. Run 4: a's owner
withdraws with no other site connected; the merge equals c's alone."""

import json

from helpers import assert_same_merge, perturbed, save_owner, tiny_model, write_data

from fusion.cli import main as gramfuse
from fusion.sumsfile import SUMS_FILE
from server.processes import Loopback
from server.state import CURRENT


def report_of(out):
    return json.loads((out / "report.json").read_text())


def statuses(report):
    return {o["site"]: o["status"] for o in report["federation"]["owners"].values()}


def test_owners_join_and_leave_across_runs_exactly(tmp_path):
    base = tiny_model("bert")
    sites = {name: (save_owner(perturbed(base, seed=70 + i), tmp_path / name / "model"),
                    write_data(tmp_path / name / "data.jsonl", 32, seed=i)) for i, name in enumerate("abc")}
    state = tmp_path / "state"
    loopback = Loopback(tmp_path / "flower")
    try:
        loopback.start_superlink()
        for name in "ab":
            loopback.start_supernode(name, *sites[name])
        done = loopback.run(f"out-dir='{tmp_path / 'run1'}' state-dir='{state}' min-owners=2 timeout=180")
        assert (tmp_path / "run1" / "report.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
        assert (state / CURRENT).read_text().strip() == "sums-0001"

        loopback.start_supernode("c", *sites["c"])
        done = loopback.run(f"out-dir='{tmp_path / 'run2'}' state-dir='{state}' min-owners=3 timeout=180 "
                            f"record-dir='{tmp_path / 'records'}'")
        assert (tmp_path / "run2" / "report.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
        report = report_of(tmp_path / "run2")
        assert statuses(report) == {"a": "inside", "b": "inside", "c": "merged"}
        asked = {int(path.stem.split("-node-")[1]) for path in (tmp_path / "records").glob("train-*")}
        node_of = {o["site"]: o["node_id"] for o in report["federation"]["owners"].values()}
        assert asked == {node_of["c"]}  # a and b sent their layouts, and no tensor
        kept = report["federation"]["state"]
        assert {**kept, "owners": sorted(kept["owners"])} == {"from": "sums-0001", "saved": "sums-0002",
                                                             "added": ["c"], "removed": [], "owners": ["a", "b", "c"]}
        assert gramfuse(["merge", *(str(sites[n][0]) for n in "abc"), "-o", str(tmp_path / "abc"), "--quiet"]) == 0
        assert_same_merge(tmp_path / "run2", tmp_path / "abc")

        loopback.start_supernode("b-withdraws", *sites["b"], extra_config="leave=true")
        done = loopback.run(f"out-dir='{tmp_path / 'run3'}' state-dir='{state}' min-owners=2 timeout=180")
        assert (tmp_path / "run3" / "report.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
        report = report_of(tmp_path / "run3")
        assert statuses(report) == {"a": "inside", "b": "inside", "c": "inside", "b-withdraws": "removed"}
        assert report["federation"]["state"]["removed"] == ["b"]
        assert sorted(report["federation"]["state"]["owners"]) == ["a", "c"]
        assert gramfuse(["merge", *(str(sites[n][0]) for n in "ac"), "-o", str(tmp_path / "ac"), "--quiet"]) == 0
        assert_same_merge(tmp_path / "run3", tmp_path / "ac")
        ledger = json.loads((state / "sums-0003" / SUMS_FILE).read_text())
        assert sorted(o["name"] for o in ledger["owners"]) == ["a", "c"]
        assert [step["removed"] for step in ledger["history"]] == [[], [], ["b"]]

        # Without state-dir nothing is kept to subtract: the withdrawn site is left out, in plaintext (by the
        # server) and in secure mode (by the site itself, before its statistics are even loaded).
        for mode in ("plaintext", "secure"):
            out = tmp_path / f"run-{mode}"
            done = loopback.run(f"out-dir='{out}' min-owners=3 timeout=180 secure={str(mode == 'secure').lower()}")
            assert (out / "report.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
            owners = report_of(out)["federation"]["owners"].values()
            assert sorted(o["site"] for o in owners if o["status"] == "merged") == ["a", "b", "c"]
            withdrawn = [o for o in owners if o["status"] != "merged"]
            # (in secure mode the site refuses the key exchange, so the server never learns its name)
            assert [o["status"] for o in withdrawn] == ["withdrawn"] and "leave=true" in withdrawn[0]["reason"]
            assert_same_merge(out, tmp_path / "abc", mode)
    finally:
        loopback.stop()

    # Run 4, on a fresh SuperLink: a's owner withdraws, and nobody else connects at all.
    alone = Loopback(tmp_path / "flower-alone")
    try:
        alone.start_superlink()
        alone.start_supernode("a-withdraws", *sites["a"], extra_config="leave=true")
        done = alone.run(f"out-dir='{tmp_path / 'run4'}' state-dir='{state}' min-owners=1 timeout=180")
        assert (tmp_path / "run4" / "report.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        alone.stop()
    assert report_of(tmp_path / "run4")["federation"]["state"]["owners"] == ["c"]
    assert gramfuse(["merge", str(sites["c"][0]), "-o", str(tmp_path / "c-alone"), "--quiet"]) == 0
    assert_same_merge(tmp_path / "run4", tmp_path / "c-alone")
