"""Replay: from the stored inbox to live delivery, with no gap and no duplicate.  Sans-IO.

Theory of operation
-------------------
A connection replays its user's inbox on connect (after its device's ack cursor or
``?since=``), after ``resume`` and after a cluster resync.  A device seen for the first
time has no cursor yet: ``Replay`` gives it one from ``store.new_device_replay`` (0 for
``"all"``, the inbox's ``last_seq`` for ``"none"``), which the connection then saves.  Meanwhile the router keeps offering live
messages; they must be neither lost nor sent twice.  Two objects hold every decision:

* ``InboxGate`` (one per connection, for its whole life) answers the router's offers:
  ``live(seq)`` is True ("queue it") only when no replay is running and the seq is
  above what was sent; while replaying it records the highest live seq it *absorbed*
  (the replay must read up to it).
* ``Replay`` (one per replay) is the page loop as a state machine.  Its driver does the
  I/O (the store reads, queueing frames) and asks it what to do next::

      replay = Replay(gate, since, page)        # from here on live messages are absorbed
      after = replay.begin(await store.inbox_state(user))
      while after is not None:                  # None: caught up, the gate is live now
          msgs = await store.read_inbox(user, after, page)
          for m in replay.to_send(msgs):        # awaits allowed between messages
              queue(m)
              replay.sent(m.seq)
          after = replay.next_read()
      # replay.start, replay.last and replay.complete make the ``resumed`` frame

  The switch to live happens inside ``begin``/``next_read``, with no await between the
  decision and the switch: a message stored after the last read is either absorbed
  (then ``live_seq`` is above ``sent_seq`` and another page is read) or offered after
  the switch (then it is queued live).

The drivers are ``server/connection.py`` and tests/test_router.py's ReplayMachine, which
interleaves commits, routing and the steps above in every order.  Never imports trio.
"""

from __future__ import annotations

from collections.abc import Sequence

from tidings.store.records import InboxState, StoredMessage

__all__ = ["InboxGate", "Replay"]


class InboxGate:
    """Per connection: the switch from replaying stored messages to live delivery.

    No gap: while replaying, live seqs only raise ``live_seq``; a replay cannot finish
    while ``live_seq`` is above what it sent, so it reads those messages itself.  No
    duplicate: nothing at or below ``sent_seq`` is offered live again.  A new connection
    starts replaying (its first replay begins at once).
    """

    __slots__ = ("live_seq", "replaying", "sent_seq")

    def __init__(self) -> None:
        self.replaying = True
        self.sent_seq = 0
        self.live_seq = 0

    def start(self, from_seq: int) -> None:
        """A replay from ``from_seq`` begins.  ``live_seq`` is kept: a live message
        absorbed while the replay was deciding where to start must still be read."""
        self.replaying = True
        self.sent_seq = from_seq

    def live(self, seq: int) -> bool:
        """The router offers ``seq``: True to queue it now, False if absorbed."""
        if seq <= self.sent_seq:
            return False
        if self.replaying:
            if seq > self.live_seq:
                self.live_seq = seq
            return False
        return True

    def sent(self, seq: int) -> None:
        """Record that ``seq`` was handed to the client (live or replayed)."""
        self.sent_seq = seq

    def take(self, msgs: Sequence[StoredMessage]) -> list[StoredMessage]:
        """Of a page read after ``sent_seq``, the messages to send, in order."""
        return [m for m in msgs if m.seq > self.sent_seq]

    def caught_up(self, n_read: int, page: int) -> bool:
        """After a read of ``n_read`` (< ``page`` = the end): switch to live if nothing
        is left to read, and say so."""
        if n_read >= page or self.live_seq > self.sent_seq:
            return False
        self.replaying = False
        return True


class Replay:
    """One replay of an inbox: which page to read next, what to send, when to go live.

    Creating it puts the gate in replaying mode (live messages are absorbed from then
    on).  ``since``: replay after this seq (clamped to the inbox's last seq); None: after
    the device's ack cursor (``cursor``, set by ``begin``; for a new device the one
    ``new_device_replay`` gives it).  A replay that is abandoned (cancelled by a newer
    one) needs nothing undone: the next ``Replay`` on the same gate starts over.
    """

    __slots__ = ("_gate", "_n_read", "complete", "cursor", "new_device_replay", "page",
                 "since", "start")

    def __init__(self, gate: InboxGate, since: int | None, page: int,
                 new_device_replay: str = "all") -> None:
        gate.replaying = True
        self._gate = gate
        self.since = since
        self.page = page
        self.new_device_replay = new_device_replay  # "all" or "none"
        self.cursor = 0  # the device's cursor (set by begin)
        self.start = 0  # the effective start (set by begin)
        self.complete = True  # False when retention already dropped part of the gap
        self._n_read = 0

    @property
    def last(self) -> int:
        """The highest seq sent so far (``resumed.last`` once caught up)."""
        return self._gate.sent_seq

    def begin(self, state: InboxState) -> int | None:
        """The inbox state was read: fix the start.  Returns the seq to read the first
        page after, or None when nothing is stored after the start and nothing live was
        absorbed meanwhile (caught up without a page read: the gate is live now)."""
        self.cursor = state.cursor
        if state.new_device and self.new_device_replay == "none":
            self.cursor = state.last_seq  # only what is stored from now on
        start = self.cursor if self.since is None else min(self.since, state.last_seq)
        self.start = start
        self.complete = state.first_seq <= start + 1
        self._gate.start(start)
        if state.last_seq <= start and self._gate.caught_up(0, self.page):
            return None
        return start

    def to_send(self, msgs: Sequence[StoredMessage]) -> list[StoredMessage]:
        """A page was read (after the seq ``begin``/``next_read`` gave): what to send,
        in order.  Call ``sent`` for each once it is queued."""
        self._n_read = len(msgs)
        return self._gate.take(msgs)

    def sent(self, seq: int) -> None:
        self._gate.sent(seq)

    def next_read(self) -> int | None:
        """The page is sent: the seq to read the next page after, or None when caught up
        (the gate is live now)."""
        if self._gate.caught_up(self._n_read, self.page):
            return None
        return self._gate.sent_seq
