"""`edge-agent tail`'s flags of seq jumps (pure logic)."""

from __future__ import annotations

from agent.tail import SeqTracker


def test_a_jump_while_tail_was_disconnected_is_not_called_a_loss_of_the_station():
    """Readings published while tail's own connection was down never reach it (a clean session): the
    jump after its reconnection was flagged `GAP a..b missing`, as a loss at the station is."""
    tracker = SeqTracker()
    assert [tracker.see("readings", s) for s in (1, 2)] == ["", ""]
    tracker.lost_sight()
    assert tracker.see("readings", 10) == "GAP 3..9 not seen here (tail was disconnected)"
    assert tracker.see("readings", 5) == "LATE (was missing)", "a resend of them still fills the hole"
    assert tracker.see("readings", 20) == "GAP 11..19 missing", "once back, a jump is the station's again"
    assert tracker.see("alarms", 7) == "", "a stream first seen after the reconnection starts there"
