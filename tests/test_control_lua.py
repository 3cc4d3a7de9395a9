"""cluster/control_lua.py, sans-IO: the order of presence states (KnownStates), member
ids and events.  (The scripts run against Redis in tests/test_cluster_control.py.)"""

from __future__ import annotations

import pytest

from tidings.cluster.control_lua import KnownStates, decode_event, new_member_id, node_of


@pytest.mark.parametrize(("steps", "told"), [
    # (online, version, from an event?) applied in order -> what the watchers hear
    ([(True, 10, True)], [True]),                        # news of an unknown user
    ([(True, 10, False)], []),                           # a read: the reply carries it
    ([(True, 10, True), (False, 5, True)], [True]),      # older: ignored
    ([(True, 10, True), (True, 10, True)], [True]),      # the same again
    ([(True, 10, True), (False, 10, True)], [True, False]),  # same version, crossed
    ([(True, 10, True), (True, 11, True)], [True]),      # newer, same state
    ([(True, 10, True), (False, 11, False)], [True, False]),  # a newer read corrects
    ([(True, 10, True), (False, 11, True), (True, 10, True)], [True, False]),  # late echo
])
def test_only_newer_changes_are_told(steps, told):
    known = KnownStates()
    heard = [online for online, version, event in steps
             if known.apply("bob", online, version, event=event)]
    assert heard == told


def test_an_assumed_state_is_corrected_by_any_read():
    known = KnownStates()
    known.assume("bob", False)  # told from this node's view while Redis was down
    assert known.online("bob") is False
    assert known.apply("bob", True, 1, event=False) is True
    known.assume("bob", False)  # (does not overwrite a known state)
    assert known.online("bob") is True
    known.forget("bob")
    assert known.online("bob") is None and known.users() == []


def test_member_ids_name_their_node_and_events_decode():
    member = new_member_id("web-1/x", "ab12")
    assert node_of(member) == "web-1/x"
    assert decode_event(b'{"kind":"presence","changes":[]}') == {"kind": "presence", "changes": []}
    for bad in (b"not json", b"[1]", b'{"kind": 5}', b"{}"):
        assert decode_event(bad) is None
