"""``gramfuse-superlink``: Flower's SuperLink whose SQLite connections wait longer for a write lock.

The failure it prevents, reproduced deterministically: another writer holds the database's write lock longer than
Flower's 5 s (as Flower's own delete of a large delivered message does on a loaded machine); a site's push behind it
fails with "database is locked" under Flower's settings, and waits and succeeds under ours."""

import hashlib
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from flwr.proto.message_pb2 import ObjectTree
from flwr.supercore import sql_mixin
from flwr.supercore.object_store.sql_object_store import SqlObjectStore
from sqlalchemy.exc import OperationalError

from server.superlink import BUSY_TIMEOUT_ENV, wait_longer_for_sqlite_locks

HOLD_SECONDS = 6.5  # longer than Flower's busy_timeout of 5 s


def hold_write_lock(path, seconds: float) -> threading.Thread:
    """A writer that takes the database's write lock and keeps it ``seconds``."""
    taken = threading.Event()

    def hold():
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
        taken.set()
        time.sleep(seconds)
        connection.execute("COMMIT")
        connection.close()

    thread = threading.Thread(target=hold)
    thread.start()
    taken.wait(10)
    return thread


def push(store: SqlObjectStore, content: bytes) -> None:
    """What a site's reply does at the SuperLink: pre-register its object, then store it."""
    object_id = hashlib.sha256(content).hexdigest()
    store.preregister(1, ObjectTree(object_id=object_id))
    store.put(object_id, content)


def fresh_store(path) -> SqlObjectStore:
    store = SqlObjectStore(str(path), verify=False)
    store.initialize()
    push(store, b"first")  # connected (pragmas applied) before the lock is taken
    return store


def test_flowers_own_wait_loses_a_push_behind_a_long_write(tmp_path, monkeypatch):
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    store = fresh_store(tmp_path / "flower.db")
    holder = hold_write_lock(tmp_path / "flower.db", HOLD_SECONDS)
    with pytest.raises(OperationalError, match="database is locked"):
        push(store, b"a site's reply")
    holder.join()


def test_our_superlink_waits_behind_a_long_write_and_the_push_lands(tmp_path, monkeypatch):
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)  # restored after the test
    monkeypatch.delenv(BUSY_TIMEOUT_ENV, raising=False)
    assert wait_longer_for_sqlite_locks() == 120_000
    assert dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"] == "120000"
    store = fresh_store(tmp_path / "ours.db")
    holder = hold_write_lock(tmp_path / "ours.db", HOLD_SECONDS)
    started = time.monotonic()
    push(store, b"a site's reply")
    assert time.monotonic() - started >= HOLD_SECONDS - 1.0  # it waited for the lock rather than failing
    assert store.get(hashlib.sha256(b"a site's reply").hexdigest()) == b"a site's reply"
    holder.join()


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_a_bad_wait_setting_is_a_clear_error(value):
    done = subprocess.run([sys.executable, "-m", "server.superlink", "--help"], capture_output=True, text=True,
                          env={BUSY_TIMEOUT_ENV: value, "PATH": ""})
    assert done.returncode == 2
    assert BUSY_TIMEOUT_ENV in done.stderr and "Traceback" not in done.stderr


def test_it_takes_flowers_flags():
    done = subprocess.run([sys.executable, "-m", "server.superlink", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--database" in done.stdout
