"""Streaming a split's packed rows into a trainer: each reader holds a few row groups, never the split.

    split = ParquetSplit.open(store, data_uri, "train")      # row groups from the shards' Parquet footers
    stream = RowStream(split, seed=1, rank=0, world=2)       # a background thread reads ahead
    rows, mask = stream.next_rows(16)      # [16, seq_len + 1] int32 and the loss mask (None: no shard has one)
    position = stream.position()           # a StreamPosition: goes into the checkpoint
    RowStream(split, seed=1, rank=0, world=2, position=position)   # resumes with exactly the same rows

**The order** of epoch ``e`` is a function of (seed, e) alone: the split's row groups are permuted, cut
into windows of at least ``window_rows`` rows, and the rows of each window are permuted. Every row comes
once per epoch. **The share**: an epoch's rows (the *plan*, a list of position intervals; ``[0, N)`` for
a fresh epoch) are cut into ``world`` contiguous pieces of ``T // world`` rows; rank r reads piece r, so
it reads about ``1/world`` of the split plus the two windows its piece starts and ends in. Every rank
runs the same number of batches; the ``T mod world`` rows past the last piece are dropped for that epoch
and counted (``StreamPosition.dropped_rows``). A batch may straddle two epochs.

**Resume**: the position is (epoch, plan, world, rows each rank consumed of its piece). With the same
world every rank goes on with exactly its next rows; with another world the rows no rank had read yet
(and the epoch's dropped tail) become the new plan, cut into the new number of pieces: the same global
row position. On a world ``k`` times smaller, when each worker's micro-batches per step are a multiple
of ``k`` (the global batch kept by gradient accumulation), :func:`train_stream` does not re-cut: worker
r hosts the streams of the saved ranks r·k … r·k+k-1 (:class:`HostedStreams`) and takes its micro-batches
from them in turn, so every step reads the same rows as on the larger world, and the position keeps the
larger world's cut (a later resume on it is exact).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from lm.data.loader import fixed_lists
from lm.data.manifest import read_manifest
from lm.storage import ObjectStore

Interval = tuple[int, int]  # [start, stop) of positions in an epoch's order
Rows = tuple[np.ndarray, "np.ndarray | None"]  # rows [n, width] int32, loss mask [n, width] uint8 or None


class StreamPosition(BaseModel):
    """Where a stream stands (identical on every rank): what a checkpoint keeps of the data order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: int  # rows in the split (a checkpoint of other data does not resume)
    epoch: int = 0
    plan: list[Interval] | None = None  # the epoch's positions still to read at its start; None = all
    world: int = 1
    consumed: int = 0  # rows each rank has taken of its piece
    dropped_rows: int = 0  # rows left out so far so that every rank gets the same count (all epochs)

    def full_plan(self) -> list[Interval]:
        return [(0, self.rows)] if self.plan is None else list(self.plan)

    def piece_rows(self) -> int:
        return sum(b - a for a, b in self.full_plan()) // self.world

    def rebased(self, world: int) -> StreamPosition:
        """The same position for ``world`` ranks: unchanged if the world is, else the unread rows re-cut."""
        if world == self.world:
            return self
        plan, q = self.full_plan(), self.piece_rows()
        unread = [iv for r in range(self.world) for iv in take_range(plan, r * q + self.consumed, (r + 1) * q)]
        unread += take_range(plan, q * self.world, sum(b - a for a, b in plan))  # the tail no rank got
        return self.model_copy(update={"plan": merge_intervals(unread), "world": world, "consumed": 0})


def take_range(plan: list[Interval], start: int, stop: int) -> list[Interval]:
    """Positions ``start .. stop`` of the concatenated ``plan`` as intervals of the epoch's order."""
    out, offset = [], 0
    for a, b in plan:
        lo, hi = max(start, offset), min(stop, offset + b - a)
        if lo < hi:
            out.append((a + lo - offset, a + hi - offset))
        offset += b - a
    return out


def merge_intervals(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for a, b in intervals:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        elif a < b:
            out.append((a, b))
    return out


# ------------------------------------------------------------------------------------------ splits


class Split:
    """A split as units (row groups, or chunks of an array) with known row counts; ``read(i)`` loads one."""

    unit_rows: list[int]
    masked: bool  # some unit has a loss mask (units without one read as all ones)

    def read(self, i: int) -> Rows:
        raise NotImplementedError

    @property
    def rows(self) -> int:
        return sum(self.unit_rows)


class ArraySplit(Split):
    """Rows already in memory (small data, tests), as units of ``unit_rows`` rows."""

    def __init__(self, rows: np.ndarray, mask: np.ndarray | None = None, unit_rows: int = 1024):
        self.data, self.mask, self.masked = rows, mask, mask is not None
        self.starts = list(range(0, len(rows), unit_rows))
        self.unit_rows = [min(unit_rows, len(rows) - s) for s in self.starts]

    def read(self, i: int) -> Rows:
        part = slice(self.starts[i], self.starts[i] + self.unit_rows[i])
        return self.data[part], None if self.mask is None else self.mask[part]


@dataclass(frozen=True)
class RowGroup:
    uri: str
    index: int
    rows: int


class ParquetSplit(Split):
    """A split's shards (lm.data.loader's manifest), read one row group at a time through pyarrow's
    filesystem (ranged reads on S3). ``filesystem(uri) -> (pyarrow fs, path)``: the store's by default."""

    def __init__(self, groups: list[RowGroup], masked: bool, filesystem, footers: dict | None = None):
        self.groups, self.masked, self.filesystem = groups, masked, filesystem
        self.footers = footers or {}  # uri -> pyarrow FileMetaData, so a row group read is one ranged read
        self.unit_rows = [g.rows for g in groups]

    @classmethod
    def open(cls, store: ObjectStore, data_uri: str, split: str, filesystem=None) -> ParquetSplit:
        return cls.of_uris(read_manifest(store, data_uri).shards_of(data_uri, split),
                           filesystem or store.pyarrow_filesystem)

    @classmethod
    def of_uris(cls, uris: list[str], filesystem) -> ParquetSplit:
        import pyarrow.parquet as pq

        groups, masked, footers = [], False, {}
        for uri in uris:
            fs, path = filesystem(uri)
            with fs.open_input_file(path) as f:
                meta = footers[uri] = pq.ParquetFile(f).metadata
            masked = masked or "loss_mask" in meta.schema.to_arrow_schema().names  # (.names: Parquet leaf names)
            groups += [RowGroup(uri, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
        return cls(groups, masked, filesystem, footers)

    def read(self, i: int) -> Rows:
        import pyarrow.parquet as pq

        group = self.groups[i]
        fs, path = self.filesystem(group.uri)
        with fs.open_input_file(path) as f:
            table = pq.ParquetFile(f, metadata=self.footers.get(group.uri)).read_row_group(group.index)
        rows = fixed_lists(table.column("tokens"), np.int32)
        mask = fixed_lists(table.column("loss_mask"), np.uint8) if "loss_mask" in table.column_names else None
        return rows, mask


def read_head(split: Split, n: int) -> Rows:
    """The first ``n`` rows of ``split`` in stored order (a fixed, bounded set: validation)."""
    rows, masks, have = [], [], 0
    for i in range(len(split.unit_rows)):
        if have >= n:
            break
        r, m = split.read(i)
        rows.append(r[: n - have])
        masks.append(_mask_or_ones(r, m)[: n - have])
        have += len(rows[-1])
    if not rows:
        return np.zeros((0, 0), np.int32), None
    return np.concatenate(rows), np.concatenate(masks) if split.masked else None  # bounded by n


def _mask_or_ones(rows: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return np.ones_like(rows, dtype=np.uint8) if mask is None else mask


# ------------------------------------------------------------------------------------ the order


class EpochOrder:
    """Epoch ``e``'s order of a split: row groups permuted, windows of >= ``window_rows`` rows, rows
    permuted inside each window. Holds one window's rows at a time."""

    def __init__(self, split: Split, seed: int, epoch: int, window_rows: int):
        self.split, self.seed, self.epoch = split, seed, epoch
        units = np.random.default_rng([seed, epoch]).permutation(len(split.unit_rows))
        self.windows: list[list[int]] = [[]]
        self.bounds = [0]  # the first position of each window, then the epoch's end
        filled = 0
        for u in units:
            self.windows[-1].append(int(u))
            filled += split.unit_rows[u]
            if filled - self.bounds[-1] >= window_rows:
                self.windows.append([])
                self.bounds.append(filled)
        if not self.windows[-1]:
            self.windows.pop()
        else:
            self.bounds.append(filled)
        self._cached: tuple[int, Rows] | None = None

    def window(self, w: int) -> Rows:
        if self._cached is None or self._cached[0] != w:
            parts = [self.split.read(u) for u in self.windows[w]]
            rows = np.concatenate([r for r, _ in parts])  # one window: bounded by window_rows + a row group
            mask = np.concatenate([_mask_or_ones(r, m) for r, m in parts]) if self.split.masked else None
            perm = np.random.default_rng([self.seed, self.epoch, w]).permutation(len(rows))
            self._cached = (w, (rows[perm], None if mask is None else mask[perm]))
        return self._cached[1]

    def slices(self, interval: Interval) -> Iterator[Rows]:
        """The rows at positions ``interval`` of this epoch, window by window."""
        a, b = interval
        w = int(np.searchsorted(self.bounds, a, side="right")) - 1
        while a < b:
            start, stop = self.bounds[w], self.bounds[w + 1]
            rows, mask = self.window(w)
            hi = min(b, stop)
            yield rows[a - start : hi - start].copy(), None if mask is None else mask[a - start : hi - start].copy()
            a, w = hi, w + 1


# ----------------------------------------------------------------------------------- the stream


class RowStream:
    """Rank ``rank``'s endless stream of rows (see the module docstring); a thread reads ``prefetch``
    chunks ahead, so reading overlaps compute and memory holds a window plus the read-ahead."""

    def __init__(self, split: Split, seed: int, rank: int, world: int, window_rows: int = 4096,
                 prefetch: int = 4, position: StreamPosition | None = None):
        if split.rows < world:
            raise ValueError(f"{split.rows} rows cannot feed {world} workers (fewer rows than workers)")
        if position is not None and position.rows != split.rows:
            raise ValueError(f"the saved data position is for {position.rows} rows, this split has {split.rows}: "
                             "a checkpoint of other data")
        self.split, self.seed, self.rank, self.window_rows = split, seed, rank, window_rows
        self.pos = (position or StreamPosition(rows=split.rows, world=world)).rebased(world)
        self.pos = self._settled(self.pos)
        self.chunks: queue.Queue = queue.Queue(maxsize=prefetch)
        self.pending: Rows | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._produce, args=(self.pos,), daemon=True, name="row-stream")
        self.thread.start()

    def position(self) -> StreamPosition:
        return self.pos

    def next_rows(self, n: int) -> Rows:
        """The next ``n`` rows of this rank (a batch may straddle two epochs)."""
        rows, masks, have = [], [], 0
        while have < n:
            r, m = self._next_chunk(n - have)
            rows.append(r)
            masks.append(m)
            have += len(r)
        joined = np.concatenate(rows) if len(rows) > 1 else rows[0]
        if not self.split.masked:
            return joined, None
        return joined, np.concatenate(masks) if len(masks) > 1 else masks[0]

    def close(self) -> None:
        self.stopping.set()
        while self.thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self.chunks.get_nowait()
            except queue.Empty:
                self.thread.join(0.05)

    def __enter__(self) -> RowStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ internals

    def _settled(self, pos: StreamPosition) -> StreamPosition:
        """``pos``, moved on to the next epoch while its piece is used up (counting dropped rows)."""
        while pos.consumed >= pos.piece_rows():
            total = sum(b - a for a, b in pos.full_plan())
            pos = pos.model_copy(update={"epoch": pos.epoch + 1, "plan": None, "consumed": 0,
                                         "dropped_rows": pos.dropped_rows + total - pos.piece_rows() * pos.world})
        return pos

    def _next_chunk(self, most: int) -> Rows:
        if self.pending is None:
            item = self.chunks.get()
            if isinstance(item, BaseException):
                raise RuntimeError(f"reading training data failed: {item}") from item
            self.pending = item
        rows, mask = self.pending
        take = min(most, len(rows))
        self.pending = None if take == len(rows) else (rows[take:], None if mask is None else mask[take:])
        self.pos = self._settled(self.pos.model_copy(update={"consumed": self.pos.consumed + take}))
        return rows[:take], None if mask is None else mask[:take]

    def _produce(self, pos: StreamPosition) -> None:
        try:
            while not self.stopping.is_set():
                q = pos.piece_rows()
                order = EpochOrder(self.split, self.seed, pos.epoch, self.window_rows)
                piece = take_range(pos.full_plan(), self.rank * q + pos.consumed, (self.rank + 1) * q)
                for interval in piece:
                    for chunk in order.slices(interval):
                        if not self._put(chunk):
                            return
                pos = self._settled(pos.model_copy(update={"consumed": q}))
        except Exception as err:  # handed to the consumer, which raises it
            self._put(err)

    def _put(self, item) -> bool:
        while not self.stopping.is_set():
            try:
                self.chunks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


class HostedStreams:
    """Several saved ranks' streams in one worker (see the module docstring): ``next_rows`` takes from each
    in turn. Between steps every stream has given the same number of rows, so they share one position."""

    def __init__(self, streams: list[RowStream]):
        self.streams, self.turn = streams, 0

    def position(self) -> StreamPosition:
        first = self.streams[0].position()
        if any(s.position() != first for s in self.streams[1:]):
            raise RuntimeError("hosted streams read unevenly: a position is taken between two steps only")
        return first

    def next_rows(self, n: int) -> Rows:
        stream = self.streams[self.turn]
        self.turn = (self.turn + 1) % len(self.streams)
        return stream.next_rows(n)

    def close(self) -> None:
        for stream in self.streams:
            stream.close()


def train_stream(store: ObjectStore, data_uri: str, tc, rank: int = 0, world: int = 1,
                 position: StreamPosition | None = None, micro_batches: int = 1) -> RowStream | HostedStreams:
    """Rank ``rank``'s stream of the train split with the settings of ``tc`` (a TrainConfig); ``micro_batches``
    per step on each worker (gradient accumulation) decides whether a smaller world hosts the saved ranks."""
    split = ParquetSplit.open(store, data_uri, "train")
    k = position.world // world if position is not None and position.world % world == 0 else 1
    if k > 1 and micro_batches % k == 0:
        return HostedStreams([RowStream(split, tc.seed, rank * k + i, position.world, tc.shuffle_window_rows,
                                        tc.prefetch_chunks, position) for i in range(k)])
    return RowStream(split, tc.seed, rank, world, tc.shuffle_window_rows, tc.prefetch_chunks, position)


def validation_rows(store: ObjectStore, data_uri: str, tc) -> Rows | tuple[None, None]:
    """The fixed validation set of a training run: the first ``eval_batches x batch_size`` rows of the
    val split (None, None when the data has none)."""
    manifest = read_manifest(store, data_uri)
    if "val" not in manifest.splits:
        return None, None
    split = ParquetSplit.of_uris(manifest.shards_of(data_uri, "val"), store.pyarrow_filesystem)
    return read_head(split, tc.eval_batches * tc.batch_size)
