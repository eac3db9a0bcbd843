"""A data site's ledgers: the secure releases it contributed to, against differencing across runs; and the
differential-privacy budget it has spent (:class:`PrivacyBudget`).

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
import os
import time
from collections.abc import Iterable
from pathlib import Path

from fusion.privacy import PrivacyError, gaussian_epsilon

from .crypto import SecureProtocolError

LEDGER_FILENAME = "gramfuse-ledger.json"
MIN_DIFFERENCE = 3  # rosters closer than this (and not equal) reveal the few sites between them


class Ledger:
    """Releases as JSON: ``[{"contribution": ..., "sites": [...], "session": ..., "time": ...}, ...]``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def releases(self) -> list[dict]:
        return _read_list(self.path, SecureProtocolError, "ledger", "releases", "secure runs")

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
        _write_list(self.path, [*releases, entry])


def _read_list(path: Path, error: type[Exception], record: str, entries: str, refused: str) -> list[dict]:
    """A JSON list of entries (none where the file does not exist yet)."""
    if not path.is_file():
        return []
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as problem:
        # An unreadable record cannot vouch for what was released or spent: refuse rather than forget it.
        raise error(f"the site's {record} {path} is unreadable ({problem}); {refused} are refused until it is "
                    "repaired") from problem
    if not isinstance(values, list) or not all(isinstance(value, dict) for value in values):
        raise error(f"the site's {record} {path} is not a list of {entries}; {refused} are refused until it is "
                    "repaired")
    return values


def _write_list(path: Path, entries: list[dict]) -> None:
    """Written atomically: a crash leaves the old record or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(entries, indent=1))
    os.replace(partial, path)


def contribution_of(fingerprint: str, settings: dict) -> str:
    """What identifies a site's contribution across runs: the weights and how the statistics were made (every
    method's sums come from these, so the methods asked for do not matter)."""
    return json.dumps({"weights": fingerprint, "statistics": settings}, sort_keys=True)


BUDGET_FILENAME = "gramfuse-dp-budget.json"


class PrivacyBudget:
    """A site's differential-privacy spending as JSON: one entry per noise draw over its data (kept beside the data
    file: a new model folder over the same data spends from the same budget), ``[{"draw": ...,
    "noise_multiplier": ..., "delta": ..., "epsilon": ..., "time": ...}, ...]``.

    A draw is spent once: every release computed from one noisy statistics file (any number of runs, plaintext or
    secure, joining or leaving) is post-processing of it. A new draw over the same data composes with the earlier
    ones (:func:`fusion.privacy.gaussian_epsilon`), and is refused where the total would pass ``epsilon_budget``.
    """

    def __init__(self, path: str | Path, epsilon_budget: float) -> None:
        self.path, self.epsilon_budget = Path(path), float(epsilon_budget)

    def draws(self) -> list[dict]:
        return _read_list(self.path, PrivacyError, "privacy budget record", "draws", "DP releases")

    def spend(self, release: dict) -> float:
        """Record ``release`` (a :class:`fusion.privacy.Release` as a dict) unless it was spent before; returns the
        epsilon spent in all, at the smallest delta of any draw (a draw cannot buy room with a larger delta).
        Raises, recording nothing, where it would pass the budget."""
        draws = self.draws()
        try:
            multipliers = [float(d["noise_multiplier"]) for d in draws if d.get("draw") != release["draw"]]
            delta = min([float(d["delta"]) for d in draws] + [float(release["delta"])])
            spent = gaussian_epsilon([*multipliers, float(release["noise_multiplier"])], delta)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
            raise PrivacyError(f"the site's privacy budget record {self.path} or the statistics' privacy record is "
                               f"malformed ({type(error).__name__}: {error}); DP releases are refused") from error
        if any(d.get("draw") == release["draw"] for d in draws):
            return spent
        if spent > self.epsilon_budget * (1.0 + 1e-9):
            raise PrivacyError(
                f"this site's statistics would spend epsilon {spent:.3g} in all (at delta {delta:.3g}) "
                f"over {len(draws) + 1} noise draws, past its budget of {self.epsilon_budget:g} (node config "
                f"dp-budget); reuse the statistics file already drawn, or raise the budget knowingly")
        entry = {"draw": release["draw"], "noise_multiplier": release["noise_multiplier"], "delta": release["delta"],
                 "epsilon": release["epsilon"], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_list(self.path, [*draws, entry])
        return spent
