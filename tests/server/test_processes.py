"""The loopback's process bookkeeping: what it started is found (by the Flower home its processes inherit), and
nothing of it outlives stop()."""

from server.processes import Loopback


def test_stop_leaves_nothing_the_loopback_started(tmp_path):
    loopback = Loopback(tmp_path)
    try:
        loopback.start_superlink()
        found = {process.pid for process in loopback.ours()}
        assert loopback.processes["superlink"].pid in found  # ours() sees what it must stop
    finally:
        loopback.stop()
    assert loopback.ours() == []
