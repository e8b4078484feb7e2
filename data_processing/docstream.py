"""The deterministic, resumable document order: seeded shard order per epoch, split between
hosts, through a seeded shuffle buffer.

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

The state is positions, not text:

* ``epoch``, and the reading position ``unit`` (index in this host's unit order of the epoch)
  / ``line``;
* ``line_base``: lines in the earlier units of this epoch. Line ``l`` of the current unit has
  the epoch-global index ``line_base + l`` (``"lines"`` split: host ``i`` owns the lines with
  ``index % P == i``);
* ``emitted``: documents that left the buffer this epoch. The shuffle buffer draws its random
  numbers from a counter-based stream keyed by ``(seed, epoch, host, emitted // 1024)``, so no
  generator state has to be saved;
* ``buffer``: the ``(unit, line)`` positions held by the shuffle buffer, in buffer order. On
  restore their texts are re-read from the shards.
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
    """The ``DocStream`` state at the start of ``epoch`` (empty shuffle buffer)."""
    return {"epoch": int(epoch), "unit": 0, "line": 0, "line_base": 0, "emitted": 0, "buffer": []}


class DocStream:
    """Yields ``Document``s in the seeded, host-split, shuffled order; see module docstring."""

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
        self.finished = False
        self._lines = None
        self._rand_key: tuple[int, int] | None = None
        self._rand: np.ndarray | None = None
        state = state or epoch_start(0)
        self.epoch = int(state["epoch"])
        self.unit = int(state["unit"])
        self.line = int(state["line"])
        self.line_base = int(state["line_base"])
        self.emitted = int(state["emitted"])
        self._order = self._unit_order(self.epoch)
        self._reader_done = self.unit >= len(self._order)
        self.buffer: list[tuple[tuple[int, int], Document]] = self._reload_buffer(
            [(int(u), int(ln)) for u, ln in state["buffer"]]
        )

    def snapshot(self) -> dict[str, Any]:
        """The JSON-serialisable position: restoring it replays exactly the same documents."""
        return {
            "epoch": self.epoch,
            "unit": self.unit,
            "line": self.line,
            "line_base": self.line_base,
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

    def _owned(self, line_base: int):
        count, index = self.process_count, self.process_index
        if count == 1 or self.host_split == "shards":
            return lambda _line: True
        # Lines are 1-based; the epoch-global index is 0-based so host 0 gets the first document.
        return lambda line: (line_base + line - 1) % count == index

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

    def _read_one(self) -> tuple[tuple[int, int], Document] | None:
        """Next owned document of this epoch with its position, or None at the epoch's end."""
        while True:
            if self._lines is None:
                if self.unit >= len(self._order):
                    return None
                self._lines = self.source.iter_unit(
                    self._order[self.unit],
                    start_line=self.line,
                    owned=self._owned(self.line_base),
                    skip_bad=self.skip_bad,
                    bad=self.bad,
                )
            try:
                line, doc = next(self._lines)
            except StopIteration:
                self._lines = None
                self.line_base += self.line
                self.unit += 1
                self.line = 0
                continue
            self.line = line
            if doc is not None:
                return (self.unit, line), self._placed(self.unit, line, doc)

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
        self.unit = self.line = self.line_base = self.emitted = 0
        self._order = self._unit_order(self.epoch)
        self._reader_done = False
        if self.max_epochs is not None and self.epoch >= self.max_epochs:
            self.finished = True
        return EPOCH_END
