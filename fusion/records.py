"""Records a data site keeps as JSON lists (its secure ledger, its DP budget), read strictly and written atomically.

An unreadable record cannot vouch for what was released or spent: reading one refuses rather than forgets it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_list(path: Path, error: type[Exception], record: str, entries: str, refused: str) -> list[dict]:
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


def write_list(path: Path, entries: list[dict]) -> None:
    """Written atomically: a crash leaves the old record or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(entries, indent=1))
    os.replace(partial, path)
