"""BigPool: ``multiprocessing.Pool`` and ``concurrent.futures.Executor`` on machines.

How a task travels::

    caller thread                  B's event loop (one thread)              each machine
    ─────────────                  ───────────────────────────              ────────────
    map/apply/submit
      │ pickle args into chunks
      ▼
    _Job ──chunks──> _Scheduler.pending ──> _Feed (one per machine) ──submit_stream──> BigPoolWorker
                                             │  keeps slots x depth chunks              │ worker
                                             │  in flight on one streamed call          │ processes
                                             ▼                                           ▼
    get()/next() <── _Job._deliver <── results stream (records as chunks finish) <──────┘
    callbacks run on the pool's callback thread

* **Pipelining.** Each feed keeps ``maxprocs x depth`` chunks in flight on its machine, written
  as records (:mod:`bigpool.pool_wire`) on one streamed call that lasts the pool's life, so a
  chunk costs no request of its own. ``depth`` adapts to
  how long chunks take: many tiny chunks are queued on a machine so no round trip is paid per
  task; long chunks are not queued at all, so no slot idles while another holds a queue.
* **Machine loss.** When a machine stops (keepalive failure, process killed) or a worker
  process dies, the chunks it held go back to the front of the queue and run elsewhere, up to
  ``retries`` times each; every chunk is delivered at most once (late records from a lost
  machine are ignored). After that the task fails with :class:`TaskLostError` saying what
  happened to the machine or worker.
* **Laziness.** ``imap`` and ``imap_unordered`` read their input on a feeder thread, at most
  a window of chunks ahead of the consumer, so an endless generator uses bounded memory.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import concurrent.futures.process
import contextlib
import hashlib
import itertools
import logging
import math
import multiprocessing
import multiprocessing.pool
import os
import pickle
import queue
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import dill

from ._function_cache import pickle_function
from ._malloc import tune_malloc
from .h2rpc import BigpoolError, StreamReader, StreamWriter
from .h2rpc.errors import decode_error
from .h2rpc.wire import pickle_value
from .machine import B, Machine, State
from .machine import start as start_driver
from .pool_shm import (
    SHARED_FROM,
    ArenaWriter,
    Ring,
    Shared,
    SharedError,
    make_pool_dir,
    materialize,
    remove_pool_dir,
    sweep_stale_dirs,
)
from .pool_socket import TOKEN_BYTES, RecordChannel
from .pool_socket import connect as connect_channel
from .pool_wire import (
    DRIVER_FUNCTIONS,
    OUT_OF_BAND_FROM,
    Buffer,
    LRUTable,
    OutOfBand,
    Pieces,
    Result,
    ResultDecoder,
    encode_chunk_fields,
    join_small,
    payload_bytes,
    raw_buffer,
)
from .systems import System
from .worker import (
    ENCODE_ERROR,
    OK,
    SERVICE_NAME,
    TASK_ERROR,
    WORKER_DIED,
    WORKER_EXITED,
    PoolWorkerService,
    result_details,
)

__all__ = ["BigPool", "BigPoolExecutor", "BrokenExecutor", "PoolTerminatedError", "TaskLostError"]

# Chunks each slot may have queued on its machine at most, and the work (seconds) a slot's
# queue should hold: enough to hide a round trip, little enough to rebalance quickly.
MAX_DEPTH = 512
QUEUED_SECONDS = 0.005
# A chunk longer than this is never queued behind another on a machine: long tasks balance.
LONG_CHUNK_SECONDS = 0.05
# A chunk out this long, and this many times longer than its function's chunks take, shows
# that estimate wrong for it: what its machine holds queued behind it is taken back.
OVERDUE_SECONDS = 0.1
OVERDUE_FACTOR = 4
# How many chunks an imap may read ahead of its consumer, per worker slot.
IMAP_WINDOW_PER_SLOT = 64
# Most tasks in one submit call (bounds the size of one request).
MAX_BATCH = 1024
# How long the pool waits for a machine to stop its worker processes at shutdown.
WORKER_STOP_TIMEOUT = 10.0
# A chunk whose arguments pickle to at least this much keeps its tasks, not their pickle, while
# it waits to be sent (memory, and fresh pages that cost more than pickling again).
REPICKLE_FROM = 1024 * 1024
# Set to 0 to keep every payload on the network, even to machines on the driver's host.
SHARED_MEMORY_ENV = "BIGPOOL_SHARED_MEMORY"
# A result at least this large that arrives in several pieces is unpickled from the pieces.
PIECES_FROM = 256 * 1024
# How long a lost machine's chunks wait for its system to say how it died (retries wait too).
LOSS_DIAGNOSIS_WAIT = 2.0
# Seconds over which the status page's throughput is averaged: long enough to smooth bursts of
# chunk completions, short enough to show a slowdown within a refresh or two.
THROUGHPUT_WINDOW = 10

_log = logging.getLogger("bigpool.pool")
# Not in typeshed; the stdlib's own class, so existing except clauses catch it.
MaybeEncodingError: type[Exception] = getattr(multiprocessing.pool, "MaybeEncodingError")  # noqa: B009


class BrokenExecutor(concurrent.futures.process.BrokenProcessPool):
    """The pool can no longer run tasks (every machine is gone), or a task's worker died.

    A ``concurrent.futures.process.BrokenProcessPool``, so existing ``except`` clauses work.
    """


class TaskLostError(BrokenExecutor):
    """A task's machine or worker process died and its retries are used up.

    ``machine`` is the address; the message says how it died (exit code or signal, OOM, the
    last lines of its stderr).
    """

    def __init__(self, message: str, *, machine: str | None = None,
                 exitcode: int | None = None, oom: bool = False) -> None:
        super().__init__(message)
        self.machine = machine
        self.exitcode = exitcode
        self.oom = oom

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_task_lost, (str(self), self.machine, self.exitcode, self.oom))


def _rebuild_task_lost(message: str, machine: str | None, exitcode: int | None,
                       oom: bool) -> TaskLostError:
    return TaskLostError(message, machine=machine, exitcode=exitcode, oom=oom)


class PoolTerminatedError(BigpoolError):
    """The pool was terminated before this result arrived."""


# encoding ---------------------------------------------------------------------------------------


class _Function:
    """A function pickled once, with the id machines cache it by."""

    __slots__ = ("__weakref__", "data", "id")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.id = hashlib.blake2b(data, digest_size=16).digest()


_functions: weakref.WeakKeyDictionary[Any, _Function] = weakref.WeakKeyDictionary()


def _function(func: Callable[..., Any]) -> _Function:
    """``func`` pickled for the machines (see :mod:`bigpool._function_cache` for when a
    function's pickle is reused)."""
    try:
        data = pickle_function(func)
    except Exception as exc:
        _note(exc, f"bigpool: the function {_name_of(func)} cannot be pickled to send to machines")
        raise _EncodeError(exc) from exc
    cached = _functions.get(func) if isinstance(func, types.FunctionType) else None
    if cached is not None and cached.data is data:
        return cached
    function = _Function(data)
    if isinstance(func, types.FunctionType):
        _functions[func] = function
    return function


def _with_out_of_band(tasks: list[Any], star: bool) -> list[Any] | None:
    """``tasks`` with each large ``bytes`` argument (a task itself, or an element of a task's
    argument tuple) wrapped in :class:`OutOfBand`; ``None`` when there are none."""
    limit = OUT_OF_BAND_FROM
    wrapped: list[Any] | None = None
    wrappers: dict[int, OutOfBand] = {}  # one per object: the pickle's memo keeps one copy

    def wrap(data: bytes) -> OutOfBand:
        wrapper = wrappers.get(id(data))
        if wrapper is None:
            wrapper = wrappers[id(data)] = OutOfBand(data)
        return wrapper

    for i, task in enumerate(tasks):
        if star:
            if type(task) is tuple and any(type(a) is bytes and len(a) >= limit for a in task):
                task = tuple(wrap(a) if type(a) is bytes and len(a) >= limit else a
                             for a in task)
            else:
                continue
        elif type(task) is bytes and len(task) >= limit:
            task = wrap(task)
        else:
            continue
        if wrapped is None:
            wrapped = list(tasks)
        wrapped[i] = task
    return wrapped


def _pickle_tasks(tasks: list[Any], star: bool) -> tuple[bytes, bool, tuple[Buffer, ...]]:
    """(pickle, by_value, out-of-band buffers) of a chunk's tasks: large ``bytes`` arguments,
    and large buffers of objects that pickle out of band (numpy arrays), are sent as they are."""
    if _plain(tasks, star):
        return pickle.dumps(tasks, protocol=5), False, ()
    wrapped = _with_out_of_band(tasks, star)
    pickle_buffers: list[pickle.PickleBuffer] = []
    data, by_value = pickle_value(tasks if wrapped is None else wrapped, pickle_buffers,
                                  OUT_OF_BAND_FROM)
    return data, by_value, tuple(raw_buffer(buffer) for buffer in pickle_buffers)


# Values the C pickler writes by value, whole, and that refer to nothing (no __main__ class, no
# buffer to send out of band): a chunk of only these needs none of pickle_value's machinery.
_PLAIN_TYPES = frozenset({int, float, str, bool, type(None), complex})


def _plain(tasks: list[Any], star: bool) -> bool:
    """Whether every task (or, with ``star``, every argument of every task) is a plain value."""
    plain = _PLAIN_TYPES
    # Loops, not all(<generator>): for the one-task chunks of apply and chunksize=1 the
    # generator's set-up cost three times the check itself.
    if not star:
        for t in tasks:
            kind = type(t)
            if kind not in plain and (kind is not bytes or len(t) >= OUT_OF_BAND_FROM):
                return False
        return True
    for t in tasks:
        if type(t) is not tuple:
            return False
        for a in t:
            kind = type(a)
            if kind not in plain and (kind is not bytes or len(a) >= OUT_OF_BAND_FROM):
                return False
    return True


def _size(buffers: tuple[Buffer, ...]) -> int:
    return sum(len(buffer) for buffer in buffers)


def _note(exc: BaseException, text: str) -> None:
    """Say in the traceback what bigpool was doing (Python 3.11+ shows notes)."""
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(text)


def _name_of(func: Any) -> str:
    return str(getattr(func, "__qualname__", None) or repr(func))[:200]


class _EncodeError(Exception):
    """Arguments or a function could not be pickled; ``cause`` is why."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


# jobs -------------------------------------------------------------------------------------------


class _ChunkRef:
    """One chunk of a job as the scheduler sees it.

    ``args`` is the pickle of its tasks (with its out-of-band ``buffers``), or ``None`` for a
    large one (see :data:`REPICKLE_FROM`): those keep ``tasks`` and are pickled again when sent.
    """

    __slots__ = ("args", "args_dill", "attempts", "blocking", "buffers", "chunk_id", "func",
                 "index", "job", "ntasks", "sent_at", "shared", "star", "tasks")

    def __init__(self, job: _Job, index: int, func: _Function, args: bytes | None,
                 args_dill: bool, ntasks: int, star: bool, chunk_id: int,
                 tasks: list[Any] | None = None, buffers: tuple[Buffer, ...] = ()) -> None:
        self.job = job
        self.index = index
        self.func = func
        self.args = args
        self.buffers = buffers
        self.tasks = tasks
        self.args_dill = args_dill
        self.ntasks = ntasks
        self.star = star
        self.attempts = 0
        self.chunk_id = chunk_id
        self.blocking = False  # dispatched while its function was not known to be quick
        self.sent_at = 0.0  # time.monotonic() when last written to a machine
        self.shared: Shared | None = None  # its buffers' region in its machine's ring, if any


class _Job:
    """Something waiting for chunk results: an AsyncResult, an imap iterator or a Future."""

    pool: BigPool | None

    def start(self) -> bool:
        """Called when a chunk is dispatched; False means the job was cancelled: skip it."""
        return True

    def deliver(self, index: int, success: bool, value: Any) -> None:
        raise NotImplementedError

    def encoding_error(self, exc_text: str, value_text: str) -> BaseException:
        """The error for a result that could not be pickled (the stdlib's, per front door)."""
        return MaybeEncodingError(exc_text, value_text)

    def abandon(self, exc: BaseException) -> None:
        """The pool is gone: fail whatever is still waiting."""
        raise NotImplementedError


class _Latch:
    """A one-shot event: ``threading.Event``'s ``set``/``is_set``/``wait`` on one lock, held
    until set. An Event is a Condition and two locks, which cost a small ``apply`` more to
    make and to wake than the rest of its work in the caller. ``set`` is called once."""

    __slots__ = ("_is_set", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._is_set = False

    def is_set(self) -> bool:
        return self._is_set

    def set(self) -> None:
        self._is_set = True
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        if self._is_set:
            return True
        # Each waiter takes the lock and passes it on, so every waiter wakes.
        if self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            self._lock.release()
        return self._is_set


class ApplyResult(_Job):
    """The result of ``apply_async``: ``multiprocessing.pool.AsyncResult``'s interface."""

    def __init__(self, pool: BigPool, callback: Callable[[Any], object] | None,
                 error_callback: Callable[[BaseException], object] | None) -> None:
        self.pool = pool
        self._event = _Latch()
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value: Any = None
        self._done = False
        self._lock = threading.Lock()

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _finish(self, success: bool, value: Any) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._success, self._value = success, value
        callback = self._callback if success else self._error_callback
        if callback is None or self.pool is None:
            self._event.set()
            self._release()
        else:
            self.pool._run_callback(self._call_back, callback)

    def _call_back(self, callback: Callable[[Any], object]) -> None:
        try:
            callback(self._value)
        finally:
            self._event.set()
            self._release()

    def _release(self) -> None:
        pool = self.pool
        if pool is not None:
            pool._job_done(self)
            self.pool = None

    def deliver(self, index: int, success: bool, value: Any) -> None:
        if success:
            value = value[0]
        self._finish(success, value)

    def abandon(self, exc: BaseException) -> None:
        self._finish(False, exc)


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of ``map_async``: the list of results, or the first exception."""

    def __init__(self, pool: BigPool, length: int, chunksize: int,
                 callback: Callable[[Any], object] | None,
                 error_callback: Callable[[BaseException], object] | None) -> None:
        super().__init__(pool, callback, error_callback)
        self._chunksize = chunksize
        self._results: list[Any] = [None] * length
        self._left = math.ceil(length / chunksize) if length else 0
        self._failure: BaseException | None = None
        self._seen: set[int] = set()
        if self._left == 0:
            self._finish(True, [])

    def deliver(self, index: int, success: bool, value: Any) -> None:
        with self._lock:
            if index in self._seen or self._done:
                return
            self._seen.add(index)
            self._left -= 1
            if success:
                start = index * self._chunksize
                self._results[start : start + len(value)] = value
            elif self._failure is None:
                self._failure = value
            left = self._left
        if left == 0:
            if self._failure is None:
                self._finish(True, self._results)
            else:
                self._finish(False, self._failure)


class IMapIterator(_Job):
    """The iterator ``imap`` returns: results in input order, ``next(timeout)``."""

    def __init__(self, pool: BigPool, ordered: bool = True, whole_chunks: bool = False) -> None:
        self.pool = pool
        self._ordered = ordered
        self._whole_chunks = whole_chunks
        self._cond = threading.Condition()
        self._items: collections.deque[tuple[bool, Any]] = collections.deque()
        self._unsorted: dict[int, tuple[bool, Any]] = {}
        self._index = 0
        self._length: int | None = None
        self._consumed = 0
        self._seen: set[int] = set()

    def __iter__(self) -> IMapIterator:
        return self

    def next(self, timeout: float | None = None) -> Any:
        with self._cond:
            if not self._items:
                if self._index == self._length:
                    self._release()
                    raise StopIteration
                self._cond.wait_for(lambda: bool(self._items) or self._index == self._length,
                                    timeout)
                if not self._items:
                    if self._index == self._length:
                        self._release()
                        raise StopIteration
                    raise multiprocessing.TimeoutError
            success, value = self._items.popleft()
            self._consumed += 1
            self._cond.notify_all()
        if success:
            return value
        raise value

    __next__ = next

    def _release(self) -> None:
        pool = self.pool
        if pool is not None:
            pool._job_done(self)
            self.pool = None

    def deliver(self, index: int, success: bool, value: Any) -> None:
        item = (success, value[0] if success and not self._whole_chunks else value)
        with self._cond:
            if index in self._seen:
                return
            self._seen.add(index)
            if not self._ordered:
                self._items.append(item)
                self._index += 1
            elif index == self._index:
                self._items.append(item)
                self._index += 1
                while self._index in self._unsorted:
                    self._items.append(self._unsorted.pop(self._index))
                    self._index += 1
            else:
                self._unsorted[index] = item
            self._cond.notify_all()
            finished = self._index == self._length
        if finished:
            self._all_delivered()

    def set_length(self, length: int) -> None:
        with self._cond:
            self._length = length
            self._cond.notify_all()
            finished = self._index == self._length
        if finished:
            self._all_delivered()

    def _all_delivered(self) -> None:
        # Every result is here (the consumer may not have read them): the pool's work is done.
        pool = self.pool
        if pool is not None:
            pool._job_done(self)

    def wait_for_room(self, produced: int, window: int) -> bool:
        """Block the feeder until the consumer is within ``window`` items; False if gone."""
        with self._cond:
            while produced - self._consumed >= window:
                if self.pool is None or self.pool._state != _RUN:
                    return False
                self._cond.wait(0.5)
            return True

    def abandon(self, exc: BaseException) -> None:
        with self._cond:
            self._items.append((False, exc))
            self._length = self._index = (self._length or self._index) + 1
            self._cond.notify_all()


class IMapUnorderedIterator(IMapIterator):
    def __init__(self, pool: BigPool, whole_chunks: bool = False) -> None:
        super().__init__(pool, ordered=False, whole_chunks=whole_chunks)


class _FutureJob(_Job):
    """Feeds a ``concurrent.futures.Future`` (one task)."""

    def __init__(self, pool: BigPool, future: concurrent.futures.Future[Any]) -> None:
        self.pool = pool
        self.future = future
        self.started = False

    def start(self) -> bool:
        if self.started:
            return True  # dispatched again (taken back from a machine, or retried)
        if self.future.set_running_or_notify_cancel():
            self.started = True
            return True
        pool, self.pool = self.pool, None
        if pool is not None:
            pool._job_done(self)
        return False

    def deliver(self, index: int, success: bool, value: Any) -> None:
        pool = self.pool
        self.pool = None
        if pool is not None:
            pool._job_done(self)
            pool._run_callback(self._complete, (success, value))

    def encoding_error(self, exc_text: str, value_text: str) -> BaseException:
        # concurrent.futures raises the pickling error itself.
        return TypeError(f"the result could not be pickled: {exc_text} (result: {value_text})")

    def _complete(self, outcome: tuple[bool, Any]) -> None:
        success, value = outcome
        if self.future.done():
            return
        if success:
            self.future.set_result(value[0])
        else:
            self.future.set_exception(value)

    def abandon(self, exc: BaseException) -> None:
        if not self.future.cancelled():
            self.deliver(0, False, exc)


def _load_payload(result: Result) -> Any:
    """Unpickle an OK result's payload (straight from its pieces if it arrived in several)."""
    payload = result.payload
    if isinstance(payload, Pieces):
        unpickler = dill.Unpickler if result.payload_dill else pickle.Unpickler
        return unpickler(payload.reader()).load()
    return dill.loads(payload) if result.payload_dill else pickle.loads(payload)


# scheduling (runs on B's event loop) -------------------------------------------------------------

_RUN, _CLOSE, _TERMINATE = "RUN", "CLOSE", "TERMINATE"


class _Feed:
    """Keeps one machine busy: submits batches, reads its results stream."""

    def __init__(self, scheduler: _Scheduler, machine: Machine) -> None:
        self.scheduler = scheduler
        self.machine = machine
        self.slots = max(1, machine.maxprocs)
        self.in_flight: dict[int, _ChunkRef] = {}
        # What the machine has: kept in step with its own table (see pool_wire.Chunk).
        self.sent_functions: LRUTable[bytes, bool] = LRUTable(DRIVER_FUNCTIONS)
        self.alive = True
        self.ready = False
        # The chunk records, on one streamed call for the pool's life; written to directly.
        self.writer: StreamWriter | RecordChannel = StreamWriter()
        self.tasks: list[asyncio.Task[None]] = []
        self.stealing = False
        self.blocking = 0  # chunks in flight that may be long (see _send_loop)
        # Shared memory with a machine on this host (bigpool.pool_shm): the ring its chunks'
        # large arguments go through, and its workers' result rings by name.
        self.arg_writer: ArenaWriter | None = None
        self.arg_ring_full_at: int | None = None  # its bytes in use when last found full
        self.result_rings: dict[str, Ring] = {}

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._run())]

    async def _run(self) -> None:
        machine = self.machine
        try:
            await machine.wait_async(State.RUNNING)
            if machine.state is not State.RUNNING:
                raise machine.err() or BigpoolError(f"machine {machine.addr} stopped")
            shared_dir = self.scheduler.pool._shared_dir
            channel = None
            if shared_dir is not None and await machine._call(
                    f"{SERVICE_NAME}.shared_memory", None, None):
                self._open_arg_ring(shared_dir)
                channel = await self._open_channel()
            if channel is not None:
                await self._run_channel(channel)
            else:
                await self._run_streams()
        except asyncio.CancelledError:
            self.alive = False
            return
        except BaseException as exc:
            # A crashed machine breaks its stream a moment before its system says how it
            # died; wait for that (briefly) so the error can name the exit code or signal.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(machine.wait_async(State.STOPPED), LOSS_DIAGNOSIS_WAIT)
            self.scheduler.feed_lost(self, exc)
            return
        # Ended, not broken: a machine process that dies closes its channel's socket cleanly.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(machine.wait_async(State.STOPPED), LOSS_DIAGNOSIS_WAIT)
        self.scheduler.feed_lost(self, BigpoolError(f"machine {machine.addr} ended its results"))

    async def _run_streams(self) -> None:
        """Feed the machine on one streamed call and read its results on another (over the
        network, TLS and HTTP/2) until either ends."""
        reader = await self.machine._call(f"{SERVICE_NAME}.results", None, None)
        assert isinstance(reader, StreamReader)
        self.ready = True
        sender = asyncio.get_running_loop().create_task(self._send_loop())
        self.tasks.append(sender)
        self.pump()
        try:
            await self._read_loop(reader)
        finally:
            sender.cancel()
            reader.close()

    async def _open_channel(self) -> RecordChannel | None:
        """The machine's records over a Unix socket (it shares this host: see
        :mod:`bigpool.pool_socket`), or ``None`` to use the network streams."""
        token = os.urandom(TOKEN_BYTES)
        try:
            path = await self.machine._call(f"{SERVICE_NAME}.open_channel", token, None)
            return await connect_channel(path, token)
        except (OSError, RuntimeError, BigpoolError) as exc:
            _log.debug("records to machine %s go over the network: %s", self.machine.addr, exc)
            return None

    async def _run_channel(self, channel: RecordChannel) -> None:
        """Feed the machine and read its results on ``channel`` until either ends; a machine
        that stops (its keepalive failed) ends it too: nothing else would."""
        self.writer = channel
        self.ready = True
        watch = asyncio.get_running_loop().create_task(self._abort_when_stopped(channel))
        self.tasks.append(watch)
        self.pump()
        try:
            await self._read_loop(channel)
        finally:
            watch.cancel()
            channel.abort()

    async def _abort_when_stopped(self, channel: RecordChannel) -> None:
        await self.machine.wait_async(State.STOPPED)
        channel.abort()

    def _open_arg_ring(self, directory: str) -> None:
        name = f"a{os.urandom(6).hex()}"
        try:
            ring = Ring.create(os.path.join(directory, name))
        except OSError as exc:
            _log.debug("no shared memory for machine %s: %s", self.machine.addr, exc)
            return
        self.arg_writer = ArenaWriter(ring)

    async def _send_loop(self) -> None:
        """Feed the machine on one streamed call for the pool's life (no round trip per batch)."""
        try:
            await self.machine._call(f"{SERVICE_NAME}.submit_stream", self.writer, None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # The machine is unusable: whatever it holds goes back to the queue.
            self.scheduler.feed_lost(self, exc)
            return
        self.scheduler.feed_lost(
            self, BigpoolError(f"machine {self.machine.addr} ended the chunk stream"))

    def pump(self, limit: int = MAX_BATCH) -> bool:
        """Write the chunks (``limit`` at most) this feed may take from the queue now to its
        machine's stream; whether it took any. With none to take and a slot free, take back
        work queued on another machine. The bytes go out at the end of the loop's turn (or at
        a flush)."""
        if not self.ready or not self.alive:
            return False
        parts = self._take_batch(min(limit, MAX_BATCH)) if self.scheduler.pending else None
        if not parts:
            if len(self.in_flight) < self.slots:
                self.scheduler.rebalance(self)
            return False
        write = self.writer.write
        for part in parts:
            write(part)
        return True

    def _take_batch(self, limit: int) -> list[Buffer]:
        """The records of the chunks to send now (small ones joined), moved to in-flight."""
        scheduler = self.scheduler
        parts: list[Buffer] = []
        count = 0
        now = time.monotonic()
        depth_of: tuple[bytes, int] = (b"", 0)  # the last function's depth (most batches have one)
        while count < limit:
            head = scheduler.peek()
            if head is None:
                break
            if head.func.id != depth_of[0]:
                depth_of = (head.func.id, scheduler.depth(head.func.id))
            depth = depth_of[1]
            if self.room(depth) <= 0:
                break
            if self.arg_ring_full_at is not None and (head.args is None or _size(head.buffers)
                                                      >= SHARED_FROM):
                assert self.arg_writer is not None
                if self.arg_writer.placed_bytes >= self.arg_ring_full_at:
                    break  # a large chunk waits for room (results make it) here or elsewhere
                self.arg_ring_full_at = None
            ref = scheduler.take()
            assert ref is not None
            if not ref.job.start():
                continue
            args = ref.args
            buffers = ref.buffers
            if args is None:
                assert ref.tasks is not None
                try:
                    args, ref.args_dill, buffers = _pickle_tasks(ref.tasks, ref.star)
                except Exception as exc:  # pickled once already: the tasks changed since
                    scheduler.complete(ref, False, exc)
                    continue
            if self.arg_writer is not None and buffers and (
                    SHARED_FROM <= _size(buffers) <= self.arg_writer.ring.capacity):
                ref.shared = self.arg_writer.put(buffers)
                if ref.shared is None:
                    # Full of chunks in flight: wait for room (their results make it) rather
                    # than take the slow way.
                    self.arg_ring_full_at = self.arg_writer.placed_bytes
                    scheduler.pending.appendleft(ref)
                    break
                buffers = ()
            ref.blocking = depth == 1
            ref.sent_at = now
            self.blocking += ref.blocking
            self.in_flight[ref.chunk_id] = ref
            fid = ref.func.id
            func = None
            if self.sent_functions.touch(fid) is None:
                self.sent_functions.put(fid, True)
                func = ref.func.data
            parts.extend(encode_chunk_fields(ref.chunk_id, fid, func, args, ref.star,
                                             ref.args_dill, buffers, ref.shared))
            count += 1
        return join_small(parts)

    async def _read_loop(self, reader: StreamReader | RecordChannel) -> None:
        """Handle result records as their bytes arrive (in the connection's own callback: a
        result costs no turn of the event loop), until the stream ends or breaks."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        decoder = ResultDecoder(pieces_from=PIECES_FROM)
        measured = self.scheduler.measured

        def drain() -> None:
            if done.done():
                return
            try:
                while (data := reader.read_chunk_nowait()) is not None:
                    if not data:
                        if decoder.partial:
                            raise BigpoolError(f"machine {self.machine.addr} ended its results "
                                               "inside a record")
                        done.set_result(None)
                        return
                    answered: list[tuple[_ChunkRef, Result]] = []
                    for result in decoder.feed(data):
                        if result.status == WORKER_EXITED:
                            self._worker_exited(result.pid)
                            continue
                        ref = self.take_back(result.chunk_id)
                        if ref is not None:
                            measured(ref.func.id, result.seconds)
                            answered.append((ref, result))
                        elif result.shared is not None:
                            self._release_result(result.shared)
                    if not answered or not self.alive:
                        continue
                    self.pump()  # the freed room is refilled by one write per read
                    for ref, result in answered:
                        self._record(ref, result)
            except BaseException as exc:
                done.set_exception(exc)

        reader.on_arrival(drain)
        try:
            await done
        finally:
            reader.on_arrival(None)

    def _record(self, ref: _ChunkRef, result: Result) -> None:
        """Deliver the answer to the chunk ``ref`` (already taken back from in-flight)."""
        status = result.status
        if status == OK:
            try:
                value = self._load_shared(result) if result.shared else _load_payload(result)
            except Exception as exc:
                self.scheduler.complete(ref, False, exc)
                return
            self.scheduler.complete(ref, True, value)
        elif status == TASK_ERROR:
            self.scheduler.complete(ref, False, decode_error(bytes(result.payload)))
        elif status == ENCODE_ERROR:
            exc_text, value_text = result_details(result)
            self.scheduler.complete(ref, False, ref.job.encoding_error(exc_text, value_text))
        elif status == WORKER_DIED:
            details = result_details(result)
            if not isinstance(details, dict):
                details = {}
            message = str(details.get("message") or "a worker process died running the task")
            error = TaskLostError(
                f"on machine {self.machine.addr}: {message}",
                machine=self.machine.addr,
                exitcode=details.get("exitcode"),
                oom=bool(details.get("oom")),
            )
            self.scheduler.retry(ref, error)
        else:
            self.scheduler.complete(ref, False, BigpoolError(f"unknown result status {status}"))

    def _load_shared(self, result: Result) -> Any:
        """Unpickle a result whose large values are in a worker's shared-memory ring, and let
        the worker reuse their space."""
        shared = result.shared
        assert shared is not None
        ring = self._result_ring(shared.name)
        try:
            if shared.position < ring.released:
                raise SharedError(f"a result in ring {shared.name} at {shared.position} was "
                                  "released already")
            buffers = materialize(ring, shared)
        finally:
            self._release_result(shared)
        loads = dill.loads if result.payload_dill else pickle.loads
        return loads(payload_bytes(result), buffers=buffers)

    def _result_ring(self, name: str) -> Ring:
        ring = self.result_rings.get(name)
        if ring is None:
            directory = self.scheduler.pool._shared_dir
            if directory is None or not name.startswith("w"):
                raise SharedError(f"machine {self.machine.addr} named a shared-memory ring "
                                  f"({name!r}) it was not given")
            ring = self.result_rings[name] = Ring.open(directory, name, writable=True)
        return ring

    def _release_result(self, shared: Shared) -> None:
        with contextlib.suppress(SharedError):
            ring = self._result_ring(shared.name)
            if shared.end > ring.released:
                ring.release(shared.end)

    def _worker_exited(self, pid: int | None) -> None:
        """A worker of this machine exited: its result ring (if it made one) goes."""
        prefix = f"w{pid}-"
        for name in [n for n in self.result_rings if n.startswith(prefix)]:
            self.result_rings.pop(name).close()
        directory = self.scheduler.pool._shared_dir
        if directory is None:
            return
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                if name.startswith(prefix):
                    os.unlink(os.path.join(directory, name))  # mapped or not

    def _drop_rings(self) -> None:
        """Let go of every ring (the machine is gone, or the pool): never to be reused."""
        if self.arg_writer is not None:
            self.arg_writer.ring.unlink()
            self.arg_writer.ring.close()
            self.arg_writer = None
        for ring in self.result_rings.values():
            ring.unlink()
            ring.close()
        self.result_rings.clear()

    def room(self, depth: int) -> int:
        """How many more chunks of a function of ``depth`` this feed would take now.

        Nothing waits behind a chunk that may be long, and a chunk that may be long waits
        behind nothing: only quick chunks share a slot.
        """
        limit = self.slots if depth == 1 or self.blocking else self.slots * depth
        return limit - len(self.in_flight)

    def take_back(self, chunk_id: int) -> _ChunkRef | None:
        """Forget the in-flight chunk ``chunk_id`` (answered, lost or reclaimed)."""
        ref = self.in_flight.pop(chunk_id, None)
        if ref is None:
            return None
        if ref.blocking:
            self.blocking -= 1
            ref.blocking = False
        if ref.shared is not None:
            if self.arg_writer is not None:
                self.arg_writer.free(ref.shared)
            ref.shared = None
        return ref

    def stop(self) -> None:
        self.alive = False
        for task in self.tasks:
            task.cancel()
        self._drop_rings()


class _Scheduler:
    """The queue of chunks and the feeds that drain it; lives on B's loop."""

    def __init__(self, pool: BigPool, retries: int) -> None:
        self.pool = pool
        self.retries = retries
        self.pending: collections.deque[_ChunkRef] = collections.deque()
        self.feeds: list[_Feed] = []
        self.lost: list[tuple[str, BaseException]] = []
        self.func_seconds: dict[bytes, float] = {}
        self._look_again_timer: asyncio.TimerHandle | None = None
        # Figures for the status page (tasks, not chunks; a failed chunk counts all its tasks).
        self.tasks_done = 0
        self.tasks_failed = 0
        self.tasks_retried = 0
        self._done_per_second: collections.deque[list[int]] = collections.deque(
            maxlen=THROUGHPUT_WINDOW + 1
        )

    def add_machine(self, machine: Machine) -> None:
        feed = _Feed(self, machine)
        self.feeds.append(feed)
        feed.start()

    def add(self, refs: list[_ChunkRef]) -> None:
        if not self.feeds:
            self._fail_all(self._broken_error())
            for ref in refs:
                ref.job.abandon(self._broken_error())
            return
        self.pending.extend(refs)
        self._wake()

    def take(self) -> _ChunkRef | None:
        return self.pending.popleft() if self.pending else None

    def peek(self) -> _ChunkRef | None:
        return self.pending[0] if self.pending else None

    def measured(self, func_id: bytes, seconds: float) -> None:
        """A chunk of ``func_id`` took ``seconds`` on a worker (a moving average is kept)."""
        previous = self.func_seconds.get(func_id)
        self.func_seconds[func_id] = seconds if previous is None else 0.8 * previous + 0.2 * seconds
        if len(self.func_seconds) > 4096:
            self.func_seconds.pop(next(iter(self.func_seconds)))

    def depth(self, func_id: bytes) -> int:
        """Chunks of ``func_id`` a worker slot may have in flight (running + queued).

        Timing is kept per function, so what one job taught says nothing about the next.
        """
        t = self.func_seconds.get(func_id)
        if t is None:
            return 1  # until its chunks are known to be quick, queue none behind another
        if t >= LONG_CHUNK_SECONDS:
            return 1
        return max(2, min(MAX_DEPTH, 1 + math.ceil(QUEUED_SECONDS / max(t, 1e-6))))

    def _wake(self) -> None:
        """Let the feeds take what is queued, and send it now: first each its share (in
        proportion to its slots, counting what it holds already), then what room is left."""
        if not self.pending:
            return
        feeds = [f for f in self.feeds if f.ready and f.alive]
        if len(feeds) > 1:
            feeds.sort(key=lambda f: len(f.in_flight) / f.slots)
            held = sum(len(f.in_flight) for f in feeds)
            slots = sum(f.slots for f in feeds)
            per_slot = (held + len(self.pending)) / slots
            for feed in feeds:
                share = math.ceil(per_slot * feed.slots) - len(feed.in_flight)
                if share > 0 and feed.pump(share):
                    feed.writer.flush()
                if not self.pending:
                    return
        for feed in feeds:
            if feed.pump():
                feed.writer.flush()
            if not self.pending:
                return

    def rebalance(self, idle: _Feed) -> None:
        """``idle`` has free slots and nothing is queued here: take back work that another
        machine holds queued (not started), so no slot idles while another holds a queue.

        Queued work that its machine drains quicker than taking it back would is left there,
        unless the chunk that machine has held longest is overdue (its function's estimate is
        wrong for it): then all its queue is taken back. Until that could be, a timer looks
        again."""
        victim = max(
            (f for f in self.feeds if f is not idle and f.ready and not f.stealing),
            key=lambda f: len(f.in_flight) - f.slots,
            default=None,
        )
        if victim is None:
            return
        excess = len(victim.in_flight) - victim.slots
        if excess <= 0:
            return
        estimate = self.func_seconds.get
        oldest = next(iter(victim.in_flight.values()))
        overdue_at = oldest.sent_at + max(
            OVERDUE_SECONDS, OVERDUE_FACTOR * estimate(oldest.func.id, LONG_CHUNK_SECONDS))
        now = time.monotonic()
        if now >= overdue_at:
            refs = list(victim.in_flight.values())[-excess:]
        else:
            # The most recently sent chunks are the likeliest to be still queued.
            refs = list(victim.in_flight.values())[-((excess + 1) // 2) :]
            queued = sum(estimate(r.func.id, LONG_CHUNK_SECONDS) for r in refs)
            if queued < LONG_CHUNK_SECONDS:
                self._look_again(overdue_at - now)
                return  # the victim drains that faster than taking it back would pay off
        ids = [r.chunk_id for r in refs]
        victim.stealing = True
        victim.tasks.append(asyncio.get_running_loop().create_task(self._take_back(victim, ids)))

    def _look_again(self, delay: float) -> None:
        if self._look_again_timer is None:
            self._look_again_timer = asyncio.get_running_loop().call_later(
                max(delay, 0.01), self._rebalance_idle)

    def stop(self) -> None:
        """Stop every feed and the rebalancing timer (the pool is going away)."""
        for feed in list(self.feeds):
            feed.stop()
        if self._look_again_timer is not None:
            self._look_again_timer.cancel()
            self._look_again_timer = None

    def _rebalance_idle(self) -> None:
        self._look_again_timer = None
        if self.pending:
            return
        for feed in self.feeds:
            if feed.ready and feed.alive and len(feed.in_flight) < feed.slots:
                self.rebalance(feed)

    async def _take_back(self, victim: _Feed, ids: list[int]) -> None:
        try:
            dropped = await victim.machine._call_now(f"{SERVICE_NAME}.cancel", ids, 10.0)
        except Exception:
            return  # the machine is going away: its loss requeues everything anyway
        finally:
            victim.stealing = False
        refs = [ref for ref in map(victim.take_back, dropped) if ref is not None]
        if refs and victim.alive:
            self.pending.extendleft(reversed(refs))
            self._wake()

    def status(self) -> dict[str, Any]:
        """The pool's figures for the debug status page (called on B's loop).

        ``queued``: tasks waiting on the driver; ``running``: tasks sent to machines and not
        yet answered (a few of them queued there, to hide round trips); ``done``, ``failed``,
        ``retried`` since the start; ``throughput_per_second`` over the last
        :data:`THROUGHPUT_WINDOW` seconds.
        """
        now = int(time.monotonic())
        recent = sum(n for second, n in self._done_per_second
                     if now - THROUGHPUT_WINDOW <= second < now)
        return {
            "processes": self.pool._processes,
            "machines_serving": len(self.feeds),
            "machines_lost": len(self.lost),
            "tasks": {
                "queued": sum(ref.ntasks for ref in self.pending),
                "running": sum(ref.ntasks for feed in self.feeds
                               for ref in feed.in_flight.values()),
                "done": self.tasks_done,
                "failed": self.tasks_failed,
                "retried": self.tasks_retried,
            },
            "throughput_per_second": recent / THROUGHPUT_WINDOW,
        }

    def _count(self, ref: _ChunkRef, success: bool) -> None:
        if not success:
            self.tasks_failed += ref.ntasks
            return
        self.tasks_done += ref.ntasks
        now = int(time.monotonic())
        if self._done_per_second and self._done_per_second[-1][0] == now:
            self._done_per_second[-1][1] += ref.ntasks
        else:
            self._done_per_second.append([now, ref.ntasks])

    def complete(self, ref: _ChunkRef, success: bool, value: Any) -> None:
        self._count(ref, success)
        try:
            ref.job.deliver(ref.index, success, value)
        except Exception:
            _log.exception("delivering a result failed")

    def retry(self, ref: _ChunkRef, error: BaseException) -> None:
        ref.attempts += 1
        if ref.attempts > self.retries:
            self.complete(ref, False, error)
            return
        self.tasks_retried += ref.ntasks
        self.pending.appendleft(ref)
        self._wake()

    def feed_lost(self, feed: _Feed, exc: BaseException) -> None:
        if not feed.alive and feed not in self.feeds:
            return
        feed.alive = False
        if feed in self.feeds:
            self.feeds.remove(feed)
        machine = feed.machine
        reason = machine.err() or exc
        self.lost.append((machine.addr, reason))
        error = TaskLostError(
            f"machine {machine.addr} was lost: {type(reason).__name__}: {reason}",
            machine=machine.addr,
            exitcode=getattr(reason, "returncode", None),
        )
        feed._drop_rings()  # its workers may still read them: never reused
        refs = sorted(feed.in_flight.values(), key=lambda r: r.chunk_id, reverse=True)
        for ref in refs:
            feed.take_back(ref.chunk_id)
        for ref in refs:
            self.retry(ref, error)
        feed.stop()
        if machine.state is not State.STOPPED:
            machine.cancel()
        if not self.feeds:
            self._fail_all(self._broken_error())

    def _broken_error(self) -> BrokenExecutor:
        if self.lost:
            addr, reason = self.lost[-1]
            return BrokenExecutor(
                f"every machine of the pool is gone (last: {addr}: {type(reason).__name__}: "
                f"{reason})"
            )
        return BrokenExecutor("the pool has no machines")

    def _fail_all(self, exc: BaseException) -> None:
        while self.pending:
            ref = self.pending.popleft()
            self.complete(ref, False, exc)
        self.pool._broken = exc


# the pool ---------------------------------------------------------------------------------------


class _KwCall:
    """A picklable ``func(*args, **kwargs)`` for tasks with keyword arguments."""

    def __init__(self, func: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
        self.func = func
        self.kwargs = dict(kwargs)

    def __call__(self, *args: Any) -> Any:
        return self.func(*args, **self.kwargs)


def _machines_for(processes: int, maxprocs: int) -> int:
    return max(1, math.ceil(processes / maxprocs))


class BigPool:
    """A process pool whose workers live on machines: ``multiprocessing.Pool``'s interface.

    ``processes`` is the number of worker slots in all (default: this host's CPU count); on
    the local system that is that many machines of one worker process each. ``system`` is a
    system name or object; ``system_options`` go to its constructor. ``services`` are
    installed on every machine beside the pool's own (``p.machines`` gives the machines for
    direct calls). A task whose machine or worker dies is run again elsewhere up to
    ``retries`` times. ``debug`` (``"127.0.0.1:3333"``) serves the debug endpoint, whose
    status page shows the pool's task counts (see :func:`bigpool.start`).
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        *,
        system: str | System = "local",
        services: Mapping[str, object] | None = None,
        retries: int = 3,
        debug: str | None = None,
        shared_memory: bool = True,
        _fail_on_start: bool = True,
        **system_options: Any,
    ) -> None:
        if processes is None:
            processes = os.cpu_count() or 1
        if not isinstance(processes, int) or isinstance(processes, bool):
            raise TypeError(f"processes must be an integer, not {type(processes).__name__}")
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative integer, not {retries!r}")
        self._processes = processes
        self._state = _RUN
        self._broken: BaseException | None = None
        self._jobs: set[_Job] = set()
        self._jobs_lock = threading.Lock()
        self._jobs_empty = threading.Condition(self._jobs_lock)
        self._chunk_ids = itertools.count()
        self._callbacks: queue.SimpleQueue[tuple[Callable[[Any], None], Any] | None] = (
            queue.SimpleQueue()
        )
        self._callback_thread = threading.Thread(
            target=self._callback_loop, name="bigpool-callbacks", daemon=True
        )
        self._callback_thread.start()
        self._b: B | None = None
        self._shared_dir: str | None = None
        try:
            tune_malloc()
            shared_token = self._make_shared_dir() if shared_memory else None
            self._b = start_driver(system, debug=debug, **system_options)
            maxprocs = self._b.system.maxprocs()
            count = _machines_for(processes, maxprocs)
            initializer_data = None
            if initializer is not None:
                initializer_data = bytes(dill.dumps((initializer, tuple(initargs)), recurse=True))
            worker = PoolWorkerService(min(processes, maxprocs), initializer_data,
                                       maxtasksperchild, self._shared_dir, shared_token)
            all_services: dict[str, object] = {SERVICE_NAME: worker}
            for name, obj in (services or {}).items():
                if name == SERVICE_NAME:
                    raise ValueError(f"the service name {SERVICE_NAME!r} is used by BigPool")
                all_services[name] = obj
            self._scheduler = _Scheduler(self, retries)
            self._services = all_services
            self._machines = self._b.start(count, services=all_services)
            self._b._run(self._attach(self._machines))
            self._b.add_status_provider("pool", self._scheduler.status)
            try:
                self._wait_first_machine()
            except BrokenExecutor as exc:
                if _fail_on_start:
                    raise
                self._broken = exc  # every task will fail with it, as the stdlib's would
        except BaseException:
            self._shutdown_machines()
            raise

    def __repr__(self) -> str:
        return f"<BigPool state={self._state} processes={self._processes}>"

    def _make_shared_dir(self) -> str | None:
        """Make the pool's shared-memory directory (bigpool.pool_shm) with a probe file that
        machines on this host will find; the probe's token, or ``None`` (no shared memory:
        ``$BIGPOOL_SHARED_MEMORY`` is 0, or ``/dev/shm`` cannot be used)."""
        if os.environ.get(SHARED_MEMORY_ENV, "1") == "0":
            return None
        token = os.urandom(16).hex()
        try:
            sweep_stale_dirs()
            self._shared_dir = make_pool_dir()
            fd = os.open(os.path.join(self._shared_dir, "probe"),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as probe:
                probe.write(token)
        except OSError as exc:
            _log.debug("no shared memory for the pool's machines: %s", exc)
            self._remove_shared_dir()
            return None
        return token

    def _remove_shared_dir(self) -> None:
        directory, self._shared_dir = self._shared_dir, None
        if directory is not None:
            remove_pool_dir(directory)

    async def _attach(self, machines: list[Machine]) -> None:
        for machine in machines:
            self._scheduler.add_machine(machine)

    def _wait_first_machine(self) -> None:
        """Return once a machine is RUNNING; raise the first machine's error if none comes up."""
        for machine in self._machines:
            machine.wait(State.RUNNING, timeout=self._b.boot_timeout if self._b else None)
            if machine.state is State.RUNNING:
                return
        err = self._machines[0].err()
        raise BrokenExecutor(f"no machine of the pool could start: {type(err).__name__}: {err}") from err

    @property
    def machines(self) -> list[Machine]:
        """The pool's machines, for direct ``machine.call`` to services passed in ``services``."""
        return list(self._machines)

    @property
    def b(self) -> B:
        assert self._b is not None
        return self._b

    def add_machines(self, n: int = 1) -> list[Machine]:
        """Start ``n`` more machines (to replace lost ones, or to grow the pool).

        They take work as soon as they are running; returned while possibly still booting.
        Raises ``ValueError`` if the pool is not running and :class:`BrokenExecutor` if it is
        already broken (a broken pool stays broken).
        """
        self._check_running()
        if self._broken is not None:
            raise BrokenExecutor(f"the pool is broken: {self._broken}")
        assert self._b is not None
        machines = self._b.start(n, services=self._services)
        self._machines.extend(machines)
        self._b._run(self._attach(machines))
        return machines

    # callbacks --------------------------------------------------------------------------------

    async def _stop_workers(self) -> None:
        """Stop the feeds, then every machine's worker processes (before the machines go)."""
        scheduler = getattr(self, "_scheduler", None)
        if scheduler is None:
            return
        scheduler.stop()
        running = [m for m in getattr(self, "_machines", []) if m.state is State.RUNNING]
        await asyncio.gather(
            *(m._call_now(f"{SERVICE_NAME}.shutdown_workers", None, WORKER_STOP_TIMEOUT)
              for m in running),
            return_exceptions=True,
        )

    def _callback_loop(self) -> None:
        while True:
            item = self._callbacks.get()
            if item is None:
                return
            function, arg = item
            try:
                function(arg)
            except Exception:
                import traceback

                traceback.print_exc()

    def _run_callback(self, function: Callable[[Any], None], arg: Any) -> None:
        self._callbacks.put((function, arg))

    # job bookkeeping ----------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state != _RUN:
            raise ValueError("Pool not running")

    def _job_added(self, job: _Job) -> None:
        with self._jobs_lock:
            self._jobs.add(job)

    def _job_done(self, job: _Job) -> None:
        with self._jobs_lock:
            self._jobs.discard(job)
            if not self._jobs:
                self._jobs_empty.notify_all()

    def _submit(self, refs: list[_ChunkRef]) -> None:
        if self._broken is not None:
            for ref in refs:
                ref.job.abandon(self._broken)
            return
        assert self._b is not None
        self._b._loop.call_soon_threadsafe(self._scheduler.add, refs)

    def _chunk(self, job: _Job, index: int, func: _Function, tasks: list[Any],
               star: bool) -> _ChunkRef:
        """A chunk of ``tasks``: argument tuples if ``star``, else single arguments."""
        try:
            args, args_dill, buffers = _pickle_tasks(tasks, star)
        except Exception as exc:
            _note(exc, "bigpool: a task's arguments cannot be pickled to send to machines")
            raise
        if len(args) >= REPICKLE_FROM:
            # Pickled here so that an error is the caller's at once; pickled again when sent,
            # so a map over large objects holds no second copy of each until its turn.
            return _ChunkRef(job, index, func, None, args_dill, len(tasks), star,
                             next(self._chunk_ids), tasks)
        return _ChunkRef(job, index, func, args, args_dill, len(tasks), star,
                         next(self._chunk_ids), buffers=buffers)

    # the multiprocessing.Pool interface ---------------------------------------------------------

    def apply(self, func: Callable[..., Any], args: Iterable[Any] = (),
              kwds: Mapping[str, Any] | None = None) -> Any:
        """``func(*args, **kwds)`` on a worker; blocks until its result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> ApplyResult:
        """Run ``func(*args, **kwds)`` on a worker; an :class:`ApplyResult` for its result."""
        self._check_running()
        result = ApplyResult(self, callback, error_callback)
        self._job_added(result)
        target = _KwCall(func, kwds) if kwds else func
        try:
            ref = self._chunk(result, 0, _function(target), [tuple(args)], star=True)
        except Exception as exc:
            result._finish(False, exc.cause if isinstance(exc, _EncodeError) else exc)
            return result
        self._submit([ref])
        return result

    def map(self, func: Callable[[Any], Any], iterable: Iterable[Any],
            chunksize: int | None = None) -> list[Any]:
        """``list(map(func, iterable))`` over the workers, in order."""
        results: list[Any] = self._map_async(func, iterable, False, chunksize).get()
        return results

    def map_async(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> MapResult:
        return self._map_async(func, iterable, False, chunksize, callback, error_callback)

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None) -> list[Any]:
        """Like :meth:`map`, calling ``func(*args)`` for each ``args`` in ``iterable``."""
        results: list[Any] = self._map_async(func, iterable, True, chunksize).get()
        return results

    def starmap_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> MapResult:
        return self._map_async(func, iterable, True, chunksize, callback, error_callback)

    def _map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        star: bool,
        chunksize: int | None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> MapResult:
        self._check_running()
        items = iterable if hasattr(iterable, "__len__") else list(iterable)
        items = list(items)
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._processes * 4)
            if extra:
                chunksize += 1
        if len(items) == 0:
            chunksize = 0
        elif chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize}")
        result = MapResult(self, len(items), max(chunksize, 1), callback, error_callback)
        if not items:
            return result
        self._job_added(result)
        try:
            function = _function(func)
            refs = []
            for index, start in enumerate(range(0, len(items), chunksize)):
                tasks = items[start : start + chunksize]
                refs.append(self._chunk(result, index, function,
                                        [tuple(t) for t in tasks] if star else tasks, star=star))
        except Exception as exc:
            result._finish(False, exc.cause if isinstance(exc, _EncodeError) else exc)
            return result
        self._submit(refs)
        return result

    def imap(self, func: Callable[[Any], Any], iterable: Iterable[Any],
             chunksize: int = 1) -> Iterator[Any]:
        """Like :meth:`map`, lazily: reads ``iterable`` only a window ahead of the consumer."""
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func: Callable[[Any], Any], iterable: Iterable[Any],
                       chunksize: int = 1) -> Iterator[Any]:
        """Like :meth:`imap`, yielding results as they finish."""
        return self._imap(func, iterable, chunksize, ordered=False)

    def _imap(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int,
              ordered: bool) -> Iterator[Any]:
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        whole = chunksize > 1
        result = IMapIterator(self, whole_chunks=whole) if ordered else IMapUnorderedIterator(
            self, whole_chunks=whole
        )
        self._job_added(result)
        function = _function(func)
        feeder = threading.Thread(
            target=self._feed_imap,
            args=(weakref.ref(result), function, iter(iterable), chunksize),
            name="bigpool-imap-feeder",
            daemon=True,
        )
        feeder.start()
        if chunksize == 1:
            return result
        return (item for chunk in result for item in chunk)

    def _feed_imap(self, result_ref: weakref.ReferenceType[IMapIterator], function: _Function,
                   iterator: Iterator[Any], chunksize: int) -> None:
        window = IMAP_WINDOW_PER_SLOT * self._processes
        index = 0
        while True:
            result = result_ref()
            if result is None or self._state == _TERMINATE:
                return
            if not result.wait_for_room(index, window):
                return
            tasks: list[Any] = []
            failure: BaseException | None = None
            try:
                for item in itertools.islice(iterator, chunksize):
                    tasks.append(item)
            except Exception as exc:
                # As the stdlib: items read before the error in a partial chunk are dropped,
                # and the error takes the next position.
                failure = exc
                tasks = []
            if tasks:
                try:
                    ref = self._chunk(result, index, function, tasks, star=False)
                except Exception as exc:
                    result.deliver(index, False, exc.cause if isinstance(exc, _EncodeError) else exc)
                else:
                    self._submit([ref])
                index += 1
            if failure is not None:
                result.deliver(index, False, failure)
                result.set_length(index + 1)
                return
            if len(tasks) < chunksize:
                result.set_length(index)
                return
            del result

    def close(self) -> None:
        """Accept no more tasks; workers exit once the submitted ones are done (see join)."""
        if self._state == _RUN:
            self._state = _CLOSE

    def terminate(self) -> None:
        """Stop at once: pending results fail with :class:`PoolTerminatedError`."""
        if self._state == _TERMINATE:
            return
        self._state = _TERMINATE
        error = PoolTerminatedError("the pool was terminated")
        with self._jobs_lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.abandon(error)
        self._shutdown_machines()

    def join(self) -> None:
        """Wait for every submitted task (after close or terminate), then stop the machines."""
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        with self._jobs_lock:
            while self._jobs and self._state != _TERMINATE:
                self._jobs_empty.wait(0.5)
        self._shutdown_machines()

    def _shutdown_machines(self) -> None:
        b, self._b = self._b, None
        if b is not None:
            try:
                b._run(self._stop_workers(), timeout=WORKER_STOP_TIMEOUT + 5)
            except Exception:
                _log.debug("stopping the pool's workers failed", exc_info=True)
            b.shutdown()
        self._remove_shared_dir()
        if self._callback_thread.is_alive():
            self._callbacks.put(None)
            if threading.current_thread() is not self._callback_thread:
                self._callback_thread.join(10)

    def __enter__(self) -> BigPool:
        self._check_running()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.terminate()

    def __del__(self) -> None:
        if getattr(self, "_b", None) is not None and getattr(self, "_state", None) == _RUN:
            import warnings

            warnings.warn(f"unclosed BigPool {self!r}", ResourceWarning, stacklevel=1)


class BigPoolExecutor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` whose workers live on machines.

    Hands out real ``concurrent.futures.Future`` objects, so ``wait`` and ``as_completed``
    work. ``max_workers`` is the number of worker slots (default: this host's CPU count).
    ``debug`` serves the debug endpoint, as for :class:`BigPool`.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        max_tasks_per_child: int | None = None,
        system: str | System = "local",
        services: Mapping[str, object] | None = None,
        retries: int = 3,
        debug: str | None = None,
        shared_memory: bool = True,
        **system_options: Any,
    ) -> None:
        if max_workers is not None:
            if not isinstance(max_workers, int) or isinstance(max_workers, bool):
                raise TypeError(f"max_workers must be an integer, not {type(max_workers).__name__}")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None and (
            not isinstance(max_tasks_per_child, int) or max_tasks_per_child < 1
        ):
            raise ValueError("max_tasks_per_child must be >= 1")
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._futures: weakref.WeakSet[concurrent.futures.Future[Any]] = weakref.WeakSet()
        try:
            self._pool = BigPool(max_workers, initializer, initargs, max_tasks_per_child,
                                 system=system, services=services, retries=retries,
                                 debug=debug, shared_memory=shared_memory,
                                 _fail_on_start=False, **system_options)
        except BrokenExecutor:
            raise
        except BigpoolError as exc:
            raise BrokenExecutor(f"the executor could not start: {exc}") from exc

    @property
    def machines(self) -> list[Machine]:
        return self._pool.machines

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            job = _FutureJob(self._pool, future)
            self._pool._job_added(job)
            target = _KwCall(fn, kwargs) if kwargs else fn
            try:
                ref = self._pool._chunk(job, 0, _function(target), [args], star=True)
            except Exception as exc:
                job.deliver(0, False, exc.cause if isinstance(exc, _EncodeError) else exc)
                return future
            self._futures.add(future)
            self._pool._submit([ref])
            return future

    submit.__doc__ = concurrent.futures.Executor.submit.__doc__

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        chunks = _chunked(zip(*iterables, strict=False), chunksize)
        results = super().map(_run_chunk, itertools.repeat(fn), chunks, timeout=timeout)
        return itertools.chain.from_iterable(results)

    map.__doc__ = concurrent.futures.Executor.map.__doc__

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._shutdown_lock:
            self._shutdown = True
            if cancel_futures:
                for future in list(self._futures):
                    future.cancel()
        if wait:
            self._pool.close()
            self._pool.join()
        else:
            threading.Thread(target=self._finish_later, name="bigpool-executor-shutdown",
                             daemon=True).start()

    shutdown.__doc__ = concurrent.futures.Executor.shutdown.__doc__

    def _finish_later(self) -> None:
        self._pool.close()
        self._pool.join()


def _chunked(iterable: Iterable[Any], size: int) -> Iterator[tuple[Any, ...]]:
    iterator = iter(iterable)
    while chunk := tuple(itertools.islice(iterator, size)):
        yield chunk


def _run_chunk(fn: Callable[..., Any], chunk: tuple[tuple[Any, ...], ...]) -> list[Any]:
    return [fn(*args) for args in chunk]

