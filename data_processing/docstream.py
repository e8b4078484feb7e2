"""The deterministic, resumable document order: seeded shard order per epoch, split between
hosts, read ``interleave`` shards at a time, through a seeded shuffle buffer.

Everything that decides *which document comes next* lives here, in one thread of the main
process, so the order never depends on worker timing. Two ways to split an epoch between
``P`` hosts (``host_split``), both disjoint and together covering every document:

* ``"shards"``: every epoch's seeded unit order (the same on every host) is dealt round-robin,
  host ``i`` reading the units ``order[(i + epoch) % P :: P]`` whole and nothing else, so no
  host opens, decompresses or parses another host's shards. Needs at least ``P`` units. A host
  gets ``floor(N/P)`` or ``ceil(N/P)`` of the ``N`` shards in one epoch (``prepare`` writes
  equal-size shards); the ``+ epoch`` turns who gets the extra ones, so over any ``P``
  consecutive epochs every host reads the same number of shards;
* ``"lines"``: every host reads every unit and owns the lines whose epoch-global index is
  ``i`` modulo ``P``: balanced to one document even with a single shard, but each host scans
  (and skips) the other hosts' lines.

Interleaving: up to ``interleave`` (K) units of this host's order are open at once, and every
line is taken from one of them chosen by a seeded draw (the draw for the ``n``-th line of the
epoch is the same on every host, so under the ``"lines"`` split all hosts read the same line
sequence and its index is the epoch-global index). A unit that ends is replaced, in its slot,
by the next unit of the order. So the documents entering the shuffle buffer come from K shards
at once instead of one shard after another (levanter, datatrove and
``datasets.interleave_datasets`` mix sources the same way). With K = 1 there is no draw and the
order is the one of a plain unit-after-unit read.

The state is positions, not text:

* ``epoch``; ``opened``: how many units of this host's order of the epoch have been opened;
  ``open``: ``[unit, line]`` for every open unit in slot order (``unit`` indexes this host's
  order of the epoch, ``line`` is the last line read from it);
* ``read``: lines read this epoch (owned or not): the epoch-global index of the next line, and
  the index of the next interleave draw;
* ``emitted``: documents that left the buffer this epoch. The shuffle buffer draws its random
  numbers from a counter-based stream keyed by ``(seed, epoch, host, emitted // 1024)``, so no
  generator state has to be saved;
* ``buffer``: the ``(unit, line)`` positions held by the shuffle buffer, in buffer order. On
  restore their texts are re-read from the shards.

States written before interleaving (``unit`` / ``line`` / ``line_base``, one unit at a time)
are read as the K = 1 state they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_processing.shards import BadRecordCounter, ShardError
from data_processing.sources import Document

EPOCH_END = object()  # returned once by ``next_doc`` after the last document of each epoch
HOST_SPLITS = ("lines", "shards")
_RAND_BLOCK = 1024


def epoch_start(epoch: int) -> dict[str, Any]:
    """The ``DocStream`` state at the start of ``epoch`` (no unit open, empty shuffle buffer)."""
    return {"epoch": int(epoch), "opened": 0, "open": [], "read": 0, "emitted": 0, "buffer": []}


def at_epoch_start(state: dict[str, Any] | None) -> bool:
    """Whether ``state`` (None: a fresh stream) has read nothing of its epoch yet."""
    if state is None:
        return True
    state = upgraded_state(state)
    return not (state["opened"] or state["read"] or state["emitted"] or state["buffer"])


def upgraded_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` in the current layout: a pre-interleave state (reading unit ``unit`` at
    ``line``, ``line_base`` lines before it) is the K = 1 state with that one unit open."""
    if "open" in state:
        return state
    unit, line = int(state["unit"]), int(state["line"])
    # An unopened unit at line 0 and an opened one with nothing read yet continue the same way.
    return {
        "epoch": int(state["epoch"]),
        "opened": unit + 1 if line else unit,
        "open": [[unit, line]] if line else [],
        "read": int(state["line_base"]) + line,
        "emitted": int(state["emitted"]),
        "buffer": state["buffer"],
    }


class _OpenUnit:
    """One open unit: its index in this host's order, the last line read, and its line
    iterator (created on first use, so that a restored stream opens files only when read)."""

    __slots__ = ("unit", "line", "lines")

    def __init__(self, unit: int, line: int):
        self.unit, self.line, self.lines = unit, line, None


class DocStream:
    """Yields ``Document``s in the seeded, host-split, interleaved, shuffled order; see module docstring."""

    def __init__(
        self,
        source,
        *,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_units: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        skip_bad: bool = False,
        bad: BadRecordCounter | None = None,
        max_epochs: int | None = None,
        state: dict[str, Any] | None = None,
        host_split: str = "lines",
        interleave: int = 1,
    ):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if host_split not in HOST_SPLITS:
            raise ValueError(f"host_split: expected one of {', '.join(HOST_SPLITS)}, got {host_split!r}")
        if host_split == "shards" and len(source) < process_count:
            raise ValueError(
                f"host_split='shards' needs at least as many shards as hosts: {len(source)} shard(s) for "
                f"{process_count} hosts (use 'lines')"
            )
        if int(interleave) < 1:
            raise ValueError(f"interleave: expected at least 1 open unit, got {interleave}")
        self.host_split = host_split
        self.source = source
        self.seed = int(seed)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.shuffle_units = shuffle_units
        self.process_index = process_index
        self.process_count = process_count
        self.skip_bad = skip_bad
        self.bad = bad if bad is not None else BadRecordCounter()
        self.max_epochs = max_epochs
        self.interleave = int(interleave)
        self.finished = False
        self._rand_key: tuple[int, int] | None = None
        self._rand: np.ndarray | None = None
        self._pick_key: tuple[int, int] | None = None
        self._pick: list[float] = []
        state = upgraded_state(state or epoch_start(0))
        self.epoch = int(state["epoch"])
        self.opened = int(state["opened"])
        self.open = [_OpenUnit(int(u), int(ln)) for u, ln in state["open"]]
        self.read = int(state["read"])
        self.emitted = int(state["emitted"])
        self._order = self._unit_order(self.epoch)
        self._reader_done = False
        self.buffer: list[tuple[tuple[int, int], Document]] = self._reload_buffer(
            [(int(u), int(ln)) for u, ln in state["buffer"]]
        )

    def snapshot(self) -> dict[str, Any]:
        """The JSON-serialisable position: restoring it replays exactly the same documents."""
        return {
            "epoch": self.epoch,
            "opened": self.opened,
            "open": [[u.unit, u.line] for u in self.open],
            "read": self.read,
            "emitted": self.emitted,
            "buffer": [list(pos) for pos, _ in self.buffer],
        }

    def _unit_order(self, epoch: int) -> list[int]:
        """This host's units of ``epoch``, in reading order (source unit indices)."""
        n = len(self.source)
        if not self.shuffle_units:
            order = list(range(n))
        else:
            # Same on every host (no process index in the key): hosts must agree on global indices.
            order = [int(i) for i in np.random.default_rng([self.seed, epoch, 1]).permutation(n)]
        if self.host_split == "shards":
            return order[(self.process_index + epoch) % self.process_count :: self.process_count]
        return order

    def _owned_now(self, _line: int) -> bool:
        """Whether this host owns the line being read: sources call ``owned`` as they reach a
        line, and ``read`` is then that line's epoch-global index (0-based, so host 0 gets the
        first document)."""
        return self.read % self.process_count == self.process_index

    def _owned(self):
        if self.process_count == 1 or self.host_split == "shards":
            return lambda _line: True
        return self._owned_now

    def _placed(self, unit: int, line: int, doc: Document) -> Document:
        """``doc`` with its key: the epoch, the source's own unit index (not the epoch's shuffled
        position) and the line, which identify the document within the run."""
        return doc._replace(key=(self.epoch, self._order[unit], line))

    def _reload_buffer(self, positions: list[tuple[int, int]]) -> list[tuple[tuple[int, int], Document]]:
        """Re-read the documents at ``positions`` (grouped per unit, one forward pass each)."""
        if not positions:
            return []
        wanted: dict[int, set[int]] = {}
        for unit, line in positions:
            wanted.setdefault(unit, set()).add(line)
        texts: dict[tuple[int, int], Document] = {}
        for unit, lines in wanted.items():
            last = max(lines)
            for line, doc in self.source.iter_unit(
                self._order[unit], start_line=min(lines) - 1, owned=lines.__contains__, skip_bad=True
            ):
                if doc is not None:
                    texts[(unit, line)] = self._placed(unit, line, doc)
                if line >= last:
                    break
        missing = [p for p in positions if p not in texts]
        if missing:
            unit, line = missing[0]
            raise ShardError(
                f"{self.source.describe(self._order[unit])}:{line}: cannot restore loader state, the "
                "document is gone (did the data change since the checkpoint?)"
            )
        return [(p, texts[p]) for p in positions]

    def _fill_slots(self) -> None:
        """Open units of the epoch's order until ``interleave`` are open or none is left."""
        while len(self.open) < self.interleave and self.opened < len(self._order):
            self.open.append(_OpenUnit(self.opened, 0))
            self.opened += 1

    def _pick_slot(self) -> int:
        """The open unit the next line comes from: a seeded draw indexed by ``read``, keyed
        without the process index so that every host makes the same choice (``"lines"``)."""
        n = len(self.open)
        if n == 1:
            return 0  # no draw: K = 1 reads unit after unit
        block, offset = divmod(self.read, _RAND_BLOCK)
        key = (self.epoch, block)
        if self._pick_key != key:
            # A list, not an array: this runs once per line, and list indexing is the cheaper.
            self._pick = np.random.default_rng([self.seed, self.epoch, block, 3]).random(_RAND_BLOCK).tolist()
            self._pick_key = key
        return min(int(self._pick[offset] * n), n - 1)

    def _close_slot(self, slot: int) -> None:
        """The unit in ``slot`` ended: the next unit of the order takes its slot, if any."""
        if self.opened < len(self._order):
            self.open[slot] = _OpenUnit(self.opened, 0)
            self.opened += 1
        else:
            del self.open[slot]

    def _next_line(self, current: _OpenUnit):
        """The next ``(line, document | None)`` of ``current``, or None once it has ended."""
        if current.lines is None:
            current.lines = self.source.iter_unit(
                self._order[current.unit],
                start_line=current.line,
                owned=self._owned(),
                skip_bad=self.skip_bad,
                bad=self.bad,
            )
        return next(current.lines, None)

    def _read_one(self) -> tuple[tuple[int, int], Document] | None:
        """Next owned document of this epoch with its position, or None at the epoch's end."""
        while True:
            self._fill_slots()
            if not self.open:
                return None
            slot = self._pick_slot()
            current = self.open[slot]
            item = self._next_line(current)
            if item is None:
                # The same draw (same ``read``) picks again among the remaining units.
                self._close_slot(slot)
                continue
            line, doc = item
            current.line = line
            self.read += 1
            if doc is not None:
                return (current.unit, line), self._placed(current.unit, line, doc)

    def _rand_index(self, n: int) -> int:
        block, offset = divmod(self.emitted, _RAND_BLOCK)
        key = (self.epoch, block)
        if self._rand_key != key:
            rng = np.random.default_rng([self.seed, self.epoch, self.process_index, block, 2])
            self._rand = rng.random(_RAND_BLOCK)
            self._rand_key = key
        self.emitted += 1
        return min(int(self._rand[offset] * n), n - 1)

    def _pop_random(self) -> Document:
        j = self._rand_index(len(self.buffer))
        # Swap-remove keeps the pop O(1); the buffer order stays a pure function of the state.
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()[1]

    def next_doc(self):
        """The next ``Document``, or ``EPOCH_END`` once after each epoch.

        Raises ``ShardError`` if a whole epoch holds no document for this host (which would
        otherwise loop forever) and ``StopIteration`` after ``max_epochs`` epochs.
        """
        if self.finished:
            raise StopIteration
        while not self._reader_done:
            item = self._read_one()
            if item is None:
                self._reader_done = True
                break
            self.buffer.append(item)
            if len(self.buffer) >= self.shuffle_buffer:
                return self._pop_random()
        if self.buffer:
            return self._pop_random()
        if self.emitted == 0:
            raise ShardError(
                f"no documents for host {self.process_index} of {self.process_count} in one whole epoch "
                f"over {len(self.source)} unit(s) starting at {self.source.describe(0)}"
                + (f" ({self.bad.total} bad records skipped)" if self.bad.total else "")
            )
        self.epoch += 1
        self.opened = self.read = self.emitted = 0
        self.open = []
        self._order = self._unit_order(self.epoch)
        self._reader_done = False
        if self.max_epochs is not None and self.epoch >= self.max_epochs:
            self.finished = True
        return EPOCH_END
