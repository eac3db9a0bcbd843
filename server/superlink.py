"""``gramfuse-superlink``: Flower's ``flower-superlink``, same flags, with SQLite waiting longer for its write lock.

Why our own entry point: Flower 1.41's SuperLink keeps messages in its SQLite database and deletes a delivered
message (all its chunks) in one write transaction, which for a site's reply of a few hundred MB takes seconds on a
loaded machine (measured: 4.5 to 7.4 s for 300 MB with the CPU and disk busy). Flower sets SQLite's
``busy_timeout`` to 5 s, so the other sites' pushes waiting behind that delete fail with "database is locked" and
their replies are lost: the run fails although nothing is wrong. Waiting longer is all that is needed; Flower has no
flag for it, so this sets the pragma Flower applies to every connection, then runs Flower's own command.
"""

from __future__ import annotations

import os
import sys

BUSY_TIMEOUT_ENV = "GRAMFUSE_SQLITE_BUSY_MS"
DEFAULT_BUSY_MS = 120_000  # far beyond any single transaction we have seen; a stuck writer still ends in an error


def wait_longer_for_sqlite_locks(busy_ms: int | None = None) -> int:
    """Make every SQLite connection Flower opens from now on wait ``busy_ms`` for a lock (default: the
    ``GRAMFUSE_SQLITE_BUSY_MS`` environment variable, else two minutes); returns the value set."""
    from flwr.supercore import sql_mixin  # the module whose connect hook applies the pragmas

    if busy_ms is None:
        text = os.environ.get(BUSY_TIMEOUT_ENV, str(DEFAULT_BUSY_MS))
        try:
            busy_ms = int(text)
        except ValueError:
            raise ValueError(f"{BUSY_TIMEOUT_ENV} must be a whole number of milliseconds, not {text!r}") from None
    if busy_ms <= 0:
        raise ValueError(f"{BUSY_TIMEOUT_ENV} must be a positive number of milliseconds, not {busy_ms}")
    pragmas = dict(sql_mixin.SQLITE_PRAGMAS)
    if "busy_timeout" not in pragmas:  # a Flower that no longer sets it: our assumption is stale, say so
        raise RuntimeError("flwr no longer sets SQLite's busy_timeout; server/superlink.py needs revisiting")
    pragmas["busy_timeout"] = str(busy_ms)
    sql_mixin.SQLITE_PRAGMAS = tuple(pragmas.items())
    return busy_ms


def main() -> None:
    try:
        wait_longer_for_sqlite_locks()
    except ValueError as error:
        print(f"gramfuse-superlink: error: {error}", file=sys.stderr)
        sys.exit(2)
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
