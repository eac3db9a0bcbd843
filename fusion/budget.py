"""A data site's differential-privacy budget: every noise draw over its data, composed, refused past the budget.

Kept beside the data file (``<data>.gramfuse-dp-budget.json``), so that every model folder over the same data, and
both the federation's sites and ``gramfuse stats --dp-epsilon`` run offline, spend from the one budget.
"""

from __future__ import annotations

import time
from pathlib import Path

from .privacy import PrivacyError, gaussian_epsilon
from .records import read_list, write_list

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
        return read_list(self.path, PrivacyError, "privacy budget record", "draws", "DP releases")

    def spent(self) -> float:
        """The epsilon of every draw recorded, composed at the smallest delta of any."""
        return self._composed(self.draws())[0]

    def _composed(self, draws: list[dict]) -> tuple[float, float]:
        """Epsilon of ``draws`` composed, and the smallest delta of any (a draw cannot buy room with a larger one)."""
        if not draws:
            return 0.0, 1.0
        try:
            delta = min(float(d["delta"]) for d in draws)
            return gaussian_epsilon([float(d["noise_multiplier"]) for d in draws], delta), delta
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
            raise PrivacyError(f"the site's privacy budget record {self.path} or the statistics' privacy record is "
                               f"malformed ({type(error).__name__}: {error}); DP releases are refused") from error

    def spend(self, release: dict) -> float:
        """Record ``release`` (a :class:`fusion.privacy.Release` as a dict) unless it was spent before; returns the
        epsilon spent in all, at the smallest delta of any draw. Raises, recording nothing, where it would pass the
        budget."""
        draws, spent = self.check(release)
        if any(d.get("draw") == release["draw"] for d in draws):
            return spent
        entry = {"draw": release["draw"], "noise_multiplier": release["noise_multiplier"], "delta": release["delta"],
                 "epsilon": release["epsilon"], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_list(self.path, [*draws, entry])
        return spent

    def check(self, release: dict) -> tuple[list[dict], float]:
        """The draws recorded and the epsilon spent in all with ``release``; raises where it would pass the budget
        (a release recorded before costs nothing more)."""
        draws = self.draws()
        if "draw" not in release:
            raise PrivacyError("the statistics' privacy record is malformed (it names no draw); DP releases are refused")
        spent, delta = self._composed([*(d for d in draws if d.get("draw") != release["draw"]), release])
        if any(d.get("draw") == release["draw"] for d in draws):
            return draws, spent
        if spent > self.epsilon_budget * (1.0 + 1e-9):
            raise PrivacyError(
                f"this site's statistics would spend epsilon {spent:.3g} in all (at delta {delta:.3g}) "
                f"over {len(draws) + 1} noise draws, past its budget of {self.epsilon_budget:g} (node config "
                "dp-budget, or gramfuse stats --dp-budget); reuse the statistics file already drawn, or raise the "
                "budget knowingly", public="this release would pass the site's DP budget (node config dp-budget)")
        return draws, spent


def budget_path(data_file: str | Path) -> Path:
    """Where the budget of the data in ``data_file`` is kept: beside it."""
    data_file = Path(data_file)
    return data_file.with_name(f"{data_file.name}.{BUDGET_FILENAME}")
