"""Secure mode on a real loopback deployment over TLS, with authenticated sites (tiny models).

Five registered sites and one unregistered; one registered site is killed when its first masked request reaches it. The run
must turn the unregistered site away, recover the dropped one's masks, merge the four others exactly as
`gramfuse merge` does in plaintext, and leave in the server's records nothing that reveals any site's Grams or
weights (the plaintext deployment test runs the same audit and finds them)."""

import json
import os
import signal
import threading
import time

import pytest
from helpers import perturbed, save_owner, tiny_model, write_data
from safetensors.torch import load_file

from federation.audit import recorded_arrays, revealing
from fusion.cli import main as gramfuse
from federation.credentials import make_site_key, make_tls
from fusion.statistics import STATS_FILENAME, load_statistics
from server.processes import Loopback

SITES = ("site0", "site1", "site2", "site3", "site4")
DROPS = "site4"
LEAVES = "site3"  # stops before the second run


def kill_on_first_masked_request(loopback, site):
    """Kill ``site`` the moment its SuperNode receives its first masked request: after it has exchanged keys and
    shares, before it can answer (its ClientApp takes seconds to start)."""
    log = loopback.root / f"{site}.log"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if "Receiving: train.secure_masked" in log.read_text(errors="replace"):
            os.killpg(loopback.processes[site].pid, signal.SIGKILL)
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure-loopback")
    credentials = root / "credentials"
    make_tls(credentials, ["127.0.0.1", "localhost"])
    base = tiny_model("bert")
    sites = {}
    for i, name in enumerate(SITES):
        sites[name] = (save_owner(perturbed(base, seed=60 + i), root / name / "model"),
                       write_data(root / name / "data.jsonl", 24 + 8 * i, seed=i))
    loopback = Loopback(root, credentials=credentials, authenticate=True)
    try:
        loopback.start_superlink()
        for name, (model, data) in sites.items():
            private, public = make_site_key(credentials, name)
            loopback.register(public)
            loopback.start_supernode(name, model, data, key=private)
        intruder_key, _ = make_site_key(credentials, "intruder")  # never registered
        intruder = loopback.start_supernode("intruder", *sites["site0"], key=intruder_key)

        watcher = threading.Thread(target=kill_on_first_masked_request, args=(loopback, DROPS), daemon=True)
        watcher.start()
        done = loopback.run(f"out-dir='{root / 'out'}' secure=true record-dir='{root / 'records'}' min-owners=3 "
                            "secure-threshold=3 timeout=60 heads='shared'", timeout=900)
        watcher.join(timeout=1)
        intruder.wait(timeout=120)
        # A second run one site short of the first's release: the sites that took part in both refuse it.
        os.killpg(loopback.processes[LEAVES].pid, signal.SIGKILL)
        again = loopback.run(f"out-dir='{root / 'again'}' secure=true min-owners=2 secure-threshold=2 timeout=60 "
                             "heads='shared'", timeout=600)
    finally:
        loopback.stop()
    return root, sites, done, intruder, again


def test_secure_merge_over_tls_survives_a_dropout_and_equals_plaintext(secure_run):
    root, sites, done, _, _ = secure_run
    assert done.returncode == 0, done.stdout[-4000:]
    report = json.loads((root / "out" / "report.json").read_text())["federation"]
    owners = {o["site"]: o for o in report["owners"].values()}
    merged = sorted(site for site, o in owners.items() if o["status"] == "merged")
    assert merged == sorted(set(SITES) - {DROPS})
    dropped = owners[DROPS]["node_id"]
    assert owners[DROPS]["status"] in ("timed out", "failed")
    assert dropped in report["secure"]["rounds"]["bounds"]["dropped"]  # it had exchanged shares, then vanished
    assert f"owner node {dropped} dropped out of the bounds round" in done.stdout

    offline = root / "offline"
    assert gramfuse(["merge", *(str(sites[s][0]) for s in merged), "-o", str(offline), "--quiet"]) == 0
    secure = load_file(str(root / "out" / "model.safetensors"))
    plaintext = load_file(str(offline / "model.safetensors"))
    assert secure.keys() == plaintext.keys()
    for name, value in plaintext.items():  # both saved as float32: equal to its rounding
        assert float((secure[name] - value).abs().max() / value.abs().max().clamp_min(1e-12)) <= 1e-6, name


def test_recorded_payloads_reveal_no_site_statistics(secure_run):
    root, sites, _, _, _ = secure_run
    recorded = recorded_arrays(root / "records")
    assert any(key.startswith("sums-") for key in recorded) and any(key.startswith("bounds-") for key in recorded)
    for name in SITES:
        model_dir = sites[name][0]
        if not (model_dir / STATS_FILENAME).is_file():
            assert name == DROPS  # killed before it got to save them
            continue
        stats = load_statistics(model_dir / STATS_FILENAME)
        secrets = {f"gram {key}": stats.full_gram(key) for key in stats.grams}
        secrets.update({f"packed gram {key}": value for key, value in stats.grams.items()})
        secrets.update({f"weight {key}": value for key, value in load_file(str(model_dir / "model.safetensors")).items()})
        assert revealing(recorded, secrets) == [], name


def test_unregistered_site_is_turned_away(secure_run):
    root, _, _, intruder, _ = secure_run
    assert intruder.returncode != 0
    assert "Failed to activate SuperNode" in (root / "intruder.log").read_text()
    report = json.loads((root / "out" / "report.json").read_text())["federation"]
    assert "intruder" not in {o["site"] for o in report["owners"].values()}


def test_a_run_one_site_apart_from_an_earlier_release_is_refused_by_the_sites(secure_run):
    """Run 1 released the sum over site0..site3 (site4 dropped); run 2 would release it over site0..site2, and the
    difference would be site3's contribution exactly. Every site in both runs finds run 1 in its ledger and refuses
    before sending a share."""
    root, sites, _, _, again = secure_run
    output = again.stdout + again.stderr
    assert not (root / "again").exists(), output[-4000:]
    assert output.count("differs by 1 site(s) from that of secure run") >= 3, output[-4000:]
    for name in ("site0", "site1", "site2"):
        releases = json.loads((sites[name][0] / "gramfuse-ledger.json").read_text())
        assert len(releases) == 1 and len(releases[0]["sites"]) == 4
