"""A site's ledger of secure releases: which later rosters it refuses, and that it never loses what it recorded."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.crypto import SecureProtocolError
from federation.ledger import Ledger, contribution_of

MINE = contribution_of("weights-a", {"max_length": 128})


def test_rosters_a_few_sites_apart_are_refused_the_same_or_far_apart_allowed(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    ledger.check(MINE, {1, 2, 3, 4})  # nothing recorded yet
    ledger.record(MINE, {1, 2, 3, 4}, "session-1")
    for near in ({1, 2, 3}, {1, 2, 3, 4, 5}, {1, 2, 3, 5}, {1, 2}):
        with pytest.raises(SecureProtocolError, match="differs by"):
            ledger.check(MINE, near)
    ledger.check(MINE, {1, 2, 3, 4})  # the same sums again reveal nothing new
    ledger.check(MINE, {1, 5, 6, 7})  # six sites apart
    ledger.check(contribution_of("weights-b", {"max_length": 128}), {1, 2, 3})  # other weights: another release
    ledger.check(MINE, {1, 2, 3, 4, 5}, min_difference=1)  # the site's operator may lower the guard


@settings(max_examples=50, deadline=None)
@given(first=st.sets(st.integers(1, 12), min_size=2), second=st.sets(st.integers(1, 12), min_size=2),
       minimum=st.integers(1, 5))
def test_a_roster_is_refused_exactly_when_it_is_some_but_fewer_than_minimum_sites_apart(tmp_path_factory, first,
                                                                                          second, minimum):
    ledger = Ledger(tmp_path_factory.mktemp("ledger") / "ledger.json")
    ledger.record(MINE, first, "s")
    apart = len(first ^ second)
    if 0 < apart < minimum:
        with pytest.raises(SecureProtocolError):
            ledger.check(MINE, second, minimum)
    else:
        ledger.check(MINE, second, minimum)


def test_an_unreadable_ledger_refuses_rather_than_forgets(tmp_path):
    path = tmp_path / "ledger.json"
    Ledger(path).record(MINE, {1, 2, 3}, "s")
    Ledger(path).record(MINE, {1, 2, 3}, "s-again")  # the same release: recorded once
    assert len(Ledger(path).releases()) == 1
    path.write_text("{not json")
    with pytest.raises(SecureProtocolError, match="unreadable"):
        Ledger(path).check(MINE, {7, 8, 9})
