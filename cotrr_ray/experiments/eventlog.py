"""A durable, append-only event log: JSON Lines segment files, partitioned by kind and date.

    log = EventLog("s3://bucket/events", staging_dir="/var/tmp/cotrr-events")
    await log.append_async("feedback", records)   # returns once the lines are written and fsync'ed
    log.append_nowait("decision", [record])        # buffered; written + fsync'ed within commit_interval_s
    log.close()                                    # flushes, closes and uploads open segments

Layout under the URI (a local directory or ``s3://``, through `cotrr_ray.storage`)::

    kind=<decision|feedback>/date=YYYY-MM-DD/<UTC start>-<writer uuid>-<pid>-<seq>.jsonl

`date` is the UTC date at which the writer wrote the line. A segment is closed when it reaches
`max_segment_bytes`, when it is `max_segment_age_s` old (checked at least once a second, idle or
not), when the UTC date changes, and on `close()`. Every writer (one per Router replica) has its own
uuid, so two replicas never write one file (never Python's `hash()`: it is salted per process).

Why JSON Lines and not Parquet: a segment is appended to line by line and fsync'ed after every
group commit, so an acknowledged event is on disk before the client hears 2xx; Parquet can only
be written whole (its footer comes last), which would mean buffering acknowledged events in
memory. A process killed mid-line leaves at most one partial last line, which the reader skips.
DuckDB reads both formats, so closed segments can be compacted to Parquet later without changing
the analysis.

Durability contract
-------------------
- `append` / `append_async` resolve only after the records' lines are written and the segment
  fsync'ed. Concurrent appends share one write + fsync (group commit in one writer thread), so
  the cost per event falls as load rises. An acknowledged record therefore survives a kill of the
  process (and, with the directory entry fsync'ed when the segment is created, a crash of the node).
- `append_nowait` (used for decision records, one per rerank response) returns at once and does
  not wake the writer: the records wait in memory and are written and fsync'ed together with the
  next waited append, or at the latest `commit_interval_s` after they were queued. What a kill can
  lose is what was queued and not yet committed: the loss window is the commit latency (enqueue to
  fsync, at most about `commit_interval_s` + one fsync), exported as `commit_ms` and measured in
  bench/events_bench.py. Why not one commit per record: at a few hundred responses per second a
  writer woken per response (thread switch, write, fsync) cost the Router ~18% of its samples
  (bench/README, experiments_cost); a commit every 0.2 s costs a few fsyncs per second.
- Object-store URI: segments are staged on local disk under `staging_dir/<writer>/` (same fsync
  rule) and uploaded, whole and atomically, when closed (rotation or `close()`). A writer's
  staging directory is locked (flock) while it lives; a new writer uploads every unlocked leftover
  (a killed replica's segments) when it starts. Until uploaded, acknowledged events are durable
  on that node's disk only: a lost node loses what it had not uploaded (bound it with
  `max_segment_age_s`).

Thread-safe: any thread or event loop may append; one writer thread owns the files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from cotrr_ray.storage import Location, list_dir, locate, upload_file

logger = logging.getLogger(__name__)

KINDS = ("decision", "feedback")
_LOCK = ".lock"


def partition(kind: str, date: str) -> str:
    return f"kind={kind}/date={date}"


def _utc_date(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Segment:
    kind: str
    date: str
    rel: str  # path relative to the log root
    path: Path  # the local file (the final file for a local log, the staged copy otherwise)
    opened_at: float
    fh: Any = None
    size: int = 0
    records: int = 0


@dataclass
class _Append:
    kind: str
    data: bytes
    n: int
    enqueued: float
    future: concurrent.futures.Future | None


@dataclass
class LogStats:
    records: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    commits: int = 0
    segments_closed: int = 0
    uploads: int = 0
    recovered_uploads: int = 0
    write_errors: int = 0


class EventLog:
    """Append-only segments under `uri`; see the module docstring for the durability contract."""

    def __init__(
        self,
        uri: str,
        *,
        staging_dir: str | None = None,
        max_segment_bytes: int = 64 * 1024 * 1024,
        max_segment_age_s: float = 300.0,
        commit_interval_s: float = 0.2,
        clock: Callable[[], float] = time.time,
        on_commit: Callable[[str, int, float], None] | None = None,
        on_rotate: Callable[[str, str], None] | None = None,
    ):
        self.root: Location = locate(uri)
        self.max_segment_bytes = max_segment_bytes
        self.max_segment_age_s = max_segment_age_s
        if commit_interval_s <= 0:
            raise ValueError(f"commit_interval_s must be > 0, got {commit_interval_s}")
        self.commit_interval_s = commit_interval_s
        self.clock = clock
        self.on_commit = on_commit
        self.on_rotate = on_rotate
        self.writer_id = f"{uuid.uuid4().hex[:16]}-{os.getpid()}"
        self.stats = LogStats()
        self._seq = 0
        self._open: dict[str, _Segment] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # waited appends (and close): wake the writer
        self._buffered: deque[_Append] = deque()  # append_nowait: picked up by the writer's next commit
        self._closed = False
        self._close_lock = threading.Lock()
        self._lock_fh = None
        if self.root.local:
            self._base = Path(self.root.path)
            self._base.mkdir(parents=True, exist_ok=True)
        else:
            if staging_dir is None:
                raise ValueError(f"an object-store event log ({uri}) needs a local staging_dir")
            staging = Path(staging_dir)
            staging.mkdir(parents=True, exist_ok=True)
            self.recover_staged(staging)
            self._base = staging / self.writer_id
            self._base.mkdir()
            self._lock_fh = open(self._base / _LOCK, "w")
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until this writer closes
        self._thread = threading.Thread(target=self._run, name=f"eventlog-{self.writer_id}", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- appending

    def append(self, kind: str, records: list[dict[str, Any]]) -> concurrent.futures.Future:
        """Queue `records`; the future resolves (None) once they are written and fsync'ed, or raises."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._put(kind, records, fut)
        return fut

    async def append_async(self, kind: str, records: list[dict[str, Any]]) -> None:
        """`append`, awaited without blocking the event loop."""
        await asyncio.wrap_future(self.append(kind, records))

    def append_nowait(self, kind: str, records: list[dict[str, Any]]) -> None:
        """Buffer `records` for the next commit (at most `commit_interval_s` away), without waiting."""
        self._put(kind, records, None)

    def _put(self, kind: str, records: list[dict[str, Any]], fut: concurrent.futures.Future | None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
        if self._closed:
            raise RuntimeError("event log is closed")
        data = b"".join(orjson.dumps(r) + b"\n" for r in records)
        a = _Append(kind, data, len(records), time.perf_counter(), fut)
        if fut is None:
            self._buffered.append(a)  # deque.append is atomic: no lock, no wake-up of the writer
        else:
            self._queue.put(a)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait until everything queued before this call is fsync'ed."""
        self.append("feedback", []).result(timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        """Commit what is queued, close (and upload) every open segment, stop the writer. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        if self._lock_fh is not None:
            self._lock_fh.close()
            shutil.rmtree(self._base, ignore_errors=True)  # empty but for the lock once uploaded

    # ----------------------------------------------------------------- the writer thread

    def _run(self) -> None:
        tick = max(0.01, min(1.0, self.max_segment_age_s / 4, self.commit_interval_s))
        stop = False
        while not stop:
            try:
                batch = [self._queue.get(timeout=tick)]
            except queue.Empty:
                batch = []
            while True:  # everything queued meanwhile joins this commit: one fsync for all of it
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(a is None for a in batch)
            # Buffered records are committed on every wake-up: a waited append or close carries them
            # along (flush() means everything before it), and a timeout commits them on schedule.
            self._commit(self._take_buffered() + [a for a in batch if a is not None])
            self._rotate_aged()
        self._commit(self._take_buffered())  # appended while close() was stopping the loop
        self._close_all("close")

    def _take_buffered(self) -> list[_Append]:
        out = []
        while True:
            try:
                out.append(self._buffered.popleft())
            except IndexError:
                return out

    def _commit(self, batch: list[_Append]) -> None:
        if not batch:
            return
        try:
            touched: dict[int, _Segment] = {}
            for a in batch:
                if not a.data:
                    continue
                seg = self._segment(a.kind, len(a.data))
                seg.fh.write(a.data)
                seg.size += len(a.data)
                seg.records += a.n
                touched[id(seg)] = seg
            for seg in touched.values():
                if seg.fh.closed:  # rotated within this commit: _close fsync'ed it already
                    continue
                seg.fh.flush()
                os.fsync(seg.fh.fileno())
        except Exception as e:
            self.stats.write_errors += 1
            logger.exception("event log write failed (%d appends refused)", len(batch))
            for a in batch:
                if a.future is not None:
                    a.future.set_exception(e)
            return
        done = time.perf_counter()
        self.stats.commits += 1
        for a in batch:
            self.stats.records[a.kind] += a.n
            if a.future is not None:
                a.future.set_result(None)
        if self.on_commit is not None:
            for kind in {a.kind for a in batch if a.n}:
                oldest = min(a.enqueued for a in batch if a.kind == kind)
                n = sum(a.n for a in batch if a.kind == kind)
                self.on_commit(kind, n, (done - oldest) * 1000)

    def _segment(self, kind: str, incoming: int) -> _Segment:
        """The open segment of `kind`, after rotating one that is full, old or of another date."""
        now = self.clock()
        date = _utc_date(now)
        seg = self._open.get(kind)
        if seg is not None:
            if seg.date != date:
                self._close(seg, "date")
            elif seg.size and seg.size + incoming > self.max_segment_bytes:
                self._close(seg, "size")
            else:
                return seg
        return self._new_segment(kind, date, now)

    def _new_segment(self, kind: str, date: str, now: float) -> _Segment:
        self._seq += 1
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
        rel = f"{partition(kind, date)}/{stamp}-{self.writer_id}-{self._seq:05d}.jsonl"
        path = self._base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        seg = _Segment(kind, date, rel, path, now, fh=open(path, "xb"))
        _fsync_dir(path.parent)  # the file's name survives a node crash, not only its content
        self._open[kind] = seg
        return seg

    def _rotate_aged(self) -> None:
        now = self.clock()
        for seg in list(self._open.values()):
            if now - seg.opened_at >= self.max_segment_age_s:
                self._close(seg, "age")
            elif seg.date != _utc_date(now):
                self._close(seg, "date")

    def _close_all(self, reason: str) -> None:
        for seg in list(self._open.values()):
            self._close(seg, reason)

    def _close(self, seg: _Segment, reason: str) -> None:
        del self._open[seg.kind]
        try:
            seg.fh.flush()
            os.fsync(seg.fh.fileno())
            seg.fh.close()
            if not self.root.local:
                upload_file(seg.path, self.root.child(seg.rel))
                seg.path.unlink()
                self.stats.uploads += 1
        except Exception:
            # The staged file stays on disk (fsync'ed): the next writer's recovery uploads it.
            self.stats.write_errors += 1
            logger.exception("closing segment %s failed; it stays staged at %s", seg.rel, seg.path)
            return
        self.stats.segments_closed += 1
        if self.on_rotate is not None:
            self.on_rotate(seg.kind, reason)

    # ----------------------------------------------------------------- recovery

    def recover_staged(self, staging: Path) -> int:
        """Upload the segments of dead writers staged under `staging` (their lock is free); the count."""
        n = 0
        for name, is_dir in list_dir(locate(str(staging))):
            if not is_dir:
                continue
            d = staging / name
            try:
                fh = open(d / _LOCK, "a")
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer (another replica on this node)
                for f in sorted(d.rglob("*.jsonl")):
                    upload_file(f, self.root.child(f.relative_to(d).as_posix()))
                    f.unlink()
                    n += 1
                shutil.rmtree(d, ignore_errors=True)
            finally:
                fh.close()
        if n:
            logger.warning("uploaded %d segment(s) left staged by writers that did not close", n)
        self.stats.recovered_uploads += n
        return n
