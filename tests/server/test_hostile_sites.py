"""A site that sends a malformed reply at one step of a real Flower run (simulation engine) is rejected by node id,
and the run goes on with the others: describe (a JSON list for an object), the plaintext layout (no model type),
weights other than its layout declared, the secure keys (no label set), the secure unmasking (no metadata); and a
secure site whose Grams are inflated 1e12-fold is held to the agreed bound and left out."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import assert_same_tensors, perturbed, save_owner, simulate, tiny_model, write_data
from safetensors.torch import load_file

from fusion.cli import main as gramfuse

REPO = Path(__file__).resolve().parents[2]
OWNERS = 4


def hostile_app(root: Path, step: str) -> Path:
    """A copy of gramfuse's Flower app whose ClientApp is ``hostile_app`` set to misbehave at ``step``."""
    app = root / "app"
    for package in ("fusion", "federation", "server", "clients"):
        shutil.copytree(REPO / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy(REPO / name, app / name)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'clientapp = "clients.app:app"' in pyproject
    (app / "pyproject.toml").write_text(pyproject.replace('clientapp = "clients.app:app"',
                                                          'clientapp = "hostile_app:app"'))
    module = (Path(__file__).parent / "hostile_app.py").read_text()
    (app / "hostile_app.py").write_text(module.replace('STEP = "none"', f'STEP = "{step}"'))
    return app


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-workspace")
    base = tiny_model("bert")
    for i in range(OWNERS):
        save_owner(perturbed(base, seed=90 + i), root / f"owner{i}" / "model")
        write_data(root / f"owner{i}" / "data.jsonl", 24, seed=i)
    return root


@pytest.mark.parametrize("step, mode, fragment", [
    ("describe", "plaintext", "describe: malformed reply"),
    ("layout", "plaintext", "malformed layout"),
    ("lie", "plaintext", "is not what its layout declared"),
    ("keys", "secure", "keys: malformed reply"),
    ("unmask", "secure", "unmasking bounds: malformed reply"),
    ("inflate", "secure", "above the bound agreed for it"),
])
def test_a_malformed_reply_rejects_its_site_and_the_run_goes_on(tmp_path, workspace, step, mode, fragment):
    extra = "secure=true part-mb=0" if mode == "secure" else ""  # secure: a masked round per group of layers
    report = simulate(tmp_path, workspace, f"method='regmean' min-owners=3 {extra}", OWNERS,
                      app=hostile_app(tmp_path, step))
    owners = {o["site"] or f"node {node}": o for node, o in report["federation"]["owners"].items()}
    hostile = [o for o in owners.values() if fragment in o["reason"]]
    assert len(hostile) == 1, json.dumps(owners, indent=1)
    merged = sorted(o["site"] for o in owners.values() if o["status"] == "merged")
    if step == "unmask":  # its contribution is in the masked sums already: the others' shares recover them
        assert len(merged) == OWNERS
    else:
        assert hostile[0]["status"] == "rejected" and len(merged) == OWNERS - 1
    assert (tmp_path / "out" / "model.safetensors").is_file()
    if step == "inflate":  # held to the agreed bound, it could not encode: the merge is the three others'
        assert report["federation"]["secure"]["rounds"]["bound"]["owners_above"]
        honest = [str(workspace / f"owner{i}" / "model") for i in range(1, OWNERS)]  # their sites' statistics
        assert gramfuse(["merge", *honest, "-o", str(tmp_path / "offline"), "--quiet"]) == 0
        assert_same_tensors(load_file(str(tmp_path / "out" / "model.safetensors")),
                             load_file(str(tmp_path / "offline" / "model.safetensors")))


def test_a_secure_site_lost_after_the_first_part_ends_the_run_and_nothing_is_written(tmp_path, workspace):
    """Its first part is in the merge: merging the rest without it would need that part summed again without it,
    which would tell its contribution by difference. The run fails naming it and writes nothing."""
    from server.processes import Loopback

    simulation = Loopback(tmp_path, simulation=True)
    try:
        simulation.start_superlink()
        done = simulation.run(f"workspace='{workspace}' out-dir='{tmp_path / 'out'}' min-owners=3 timeout=300 "
                              "method='regmean' secure=true part-mb=0", num_supernodes=OWNERS,
                              app=hostile_app(tmp_path, "vanish"))
    finally:
        simulation.stop()
    output = done.stdout + done.stderr
    assert "was lost in sums/2" in output and "nothing is written" in output, output[-3000:]
    assert "secure: part 1 of" in output  # the first part was merged before the site was lost
    assert not (tmp_path / "out").exists()
