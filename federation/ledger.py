"""A data site's ledger of the secure releases it contributed to, against differencing across runs (its
differential-privacy budget is :mod:`fusion.budget`, which offline statistics spend from too).

Statistics are deterministic and each secure run decodes its sums exactly, so two runs whose rosters differ by one
site give that site's contribution as their difference (to 1e-12). A site therefore records, for every secure sum it
took part in, what it contributed (its weights' fingerprint and its statistics settings) and the sites the sum was
over; it refuses a later run with the same contribution whose roster differs from a recorded one by at least one
and fewer than ``min_difference`` sites. The same roster again is allowed: it releases the same sums.

Sites are known by their Flower node ids, which the SuperLink keeps for an authenticated SuperNode: without
authentication a reconnecting site may get a new id, and the guard sees a different roster. A server that invents
roster entries (it relays the keys) is outside this guard, as SECURITY.md says.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from fusion.records import read_list, write_list

from .crypto import SecureProtocolError

LEDGER_FILENAME = "gramfuse-ledger.json"
MIN_DIFFERENCE = 3  # rosters closer than this (and not equal) reveal the few sites between them


class Ledger:
    """Releases as JSON: ``[{"contribution": ..., "sites": [...], "session": ..., "time": ...}, ...]``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def releases(self) -> list[dict]:
        return read_list(self.path, SecureProtocolError, "ledger", "releases", "secure runs")

    def check(self, contribution: str, sites: Iterable[int], min_difference: int = MIN_DIFFERENCE) -> None:
        """Refuse a release over ``sites`` that differs from an earlier one of the same contribution by at least one
        and fewer than ``min_difference`` sites."""
        roster = {int(site) for site in sites}
        for release in self.releases():
            if release.get("contribution") != contribution:
                continue
            difference = roster ^ {int(site) for site in release.get("sites", [])}
            if 0 < len(difference) < min_difference:
                raise SecureProtocolError(
                    f"this roster differs by {len(difference)} site(s) from that of secure run "
                    f"{str(release.get('session', '?'))[:8]}, to which this site gave the same contribution: the two "
                    f"sums would reveal the sites between them (at least {min_difference} must differ; see SECURITY.md)")

    def record(self, contribution: str, sites: Iterable[int], session: str) -> None:
        """Add a release, written atomically (a crash leaves the old ledger or the new one, never half of one)."""
        releases = self.releases()
        entry = {"contribution": contribution, "sites": sorted(int(site) for site in sites), "session": session,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if any(r.get("contribution") == contribution and r.get("sites") == entry["sites"] for r in releases):
            return  # the same release again
        write_list(self.path, [*releases, entry])


def contribution_of(fingerprint: str, settings: dict) -> str:
    """What identifies a site's contribution across runs: the weights and how the statistics were made (every
    method's sums come from these, so the methods asked for do not matter)."""
    return json.dumps({"weights": fingerprint, "statistics": settings}, sort_keys=True)
