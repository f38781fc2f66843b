"""Large pool payloads through shared memory (bigpool.pool_shm): the rings on their own, the
records that name them, a worker's side, and pools on the local and test systems."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pool_support import wait_until

import bigpool.pool_shm as pool_shm
from bigpool import BigPool
from bigpool._worker_main import OK, SharedRings, run_chunk
from bigpool.pool_shm import (
    ALIGN,
    KIND_BYTEARRAY,
    KIND_BYTES,
    ArenaWriter,
    Ring,
    RingWriter,
    Shared,
    SharedError,
    decode_shared,
    encode_shared,
    make_pool_dir,
    materialize,
    remove_if_orphaned,
    sweep_stale_dirs,
)
from bigpool.pool_wire import (
    Chunk,
    OutOfBand,
    RecordError,
    Result,
    decode_chunk,
    decode_result,
    encode_chunk,
    encode_result,
)
from bigpool.systems.local import LocalSystem
from bigpool.worker import PoolWorkerService

MiB = 1 << 20
needs_dev_shm = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm here")


@pytest.fixture
def ring_dir(tmp_path: Path) -> str:
    return str(tmp_path)


# rings --------------------------------------------------------------------------------------


def test_a_payload_read_back_is_what_was_written_with_its_kinds(ring_dir: str) -> None:
    ring = Ring.create(os.path.join(ring_dir, "a1"), capacity=1 * MiB)
    writer = RingWriter(ring)
    first, second = os.urandom(1000), bytearray(os.urandom(3000))
    shared = writer.put([first, memoryview(second)])
    assert shared is not None
    assert shared.buffers == ((1000, KIND_BYTES), (3000, KIND_BYTEARRAY))
    assert shared.position % ALIGN == 0 and shared.end == shared.position + 1024 + 3008
    reader = Ring.open(ring_dir, "a1")  # another mapping of the same file, as a worker's
    got = materialize(reader, shared)
    assert got == [first, second]
    assert type(got[0]) is bytes and type(got[1]) is bytearray
    # Private copies: later writes to the ring do not change them.
    ring.region(shared.position, 10)[:] = bytes(10)
    assert got[0] == first
    reader.close()
    ring.close()


def test_space_is_reused_once_released_and_a_full_ring_says_so(ring_dir: str) -> None:
    ring = Ring.create(os.path.join(ring_dir, "r"), capacity=4096)
    writer = RingWriter(ring)
    a = writer.put([b"a" * 1500])
    b = writer.put([b"b" * 1500])
    assert a is not None and b is not None and (a.position, b.position) == (0, 1536)
    assert writer.put([b"c" * 1500]) is None  # 3072 + 1536 > 4096: no room until released
    ring.release(a.end)
    c = writer.put([b"c" * 1500])
    assert c is not None and c.position == 4096  # skipped the tail: no region wraps
    assert ring.region(c.position, 3) == b"ccc"
    assert writer.put([b"d" * 2000]) is None
    ring.release(c.end)  # all released: the next one starts at the ring's start again
    d = writer.put([b"d" * 2000])
    assert d is not None and d.position % 4096 == 0
    assert writer.put([b"x" * 5000]) is None  # larger than the ring: never fits
    ring.close()


def test_an_arena_reuses_space_freed_in_any_order_first_fit(ring_dir: str) -> None:
    ring = Ring.create(os.path.join(ring_dir, "r"), capacity=4096)
    arena = ArenaWriter(ring)
    a, b, c = (arena.put([bytes([n]) * 1000]) for n in (1, 2, 3))
    assert a is not None and b is not None and c is not None
    assert (a.position, b.position, c.position) == (0, 1024, 2048)
    assert arena.put([bytes(1500)]) is None  # 1024 left at the end
    arena.free(b)  # the middle one first: its space is usable at once, before a's and c's
    d = arena.put([b"d" * 1000])
    assert d is not None and d.position == 1024 and arena.placed_bytes == 3 * 1024
    assert ring.region(a.position, 3) == b"\x01" * 3  # the others are untouched
    arena.free(a)
    arena.free(c)
    arena.free(d)  # freed neighbours join again: the whole ring is one extent
    assert arena.placed_bytes == 0
    whole = arena.put([bytes(4096)])
    assert whole is not None and whole.position == 0
    assert arena.total_placed == 4 * 1024 + 4096
    ring.close()


def test_descriptors_round_trip_and_malformed_ones_are_named() -> None:
    shared = Shared("w12-0a0b0c0d", 123 * ALIGN, ((5, KIND_BYTES), (7, KIND_BYTEARRAY)))
    data = encode_shared(shared) + b"rest"
    assert decode_shared(data) == (shared, len(data) - 4)
    with pytest.raises(SharedError, match="too short"):
        decode_shared(data[:5])
    with pytest.raises(SharedError, match="does not fit"):
        decode_shared(data[:20])
    with pytest.raises(SharedError, match="is not a shared-memory ring name"):
        decode_shared(encode_shared(Shared("../etc", 0, ((1, KIND_BYTES),))))
    with pytest.raises(SharedError, match="kind"):
        decode_shared(encode_shared(Shared("r", 0, ((1, 9),))))
    with pytest.raises(SharedError, match="0 buffers"):
        decode_shared(encode_shared(Shared("r", 0, ())))


def test_a_ring_is_opened_only_by_plain_name_and_must_be_a_ring(ring_dir: str) -> None:
    Path(ring_dir, "plain").write_bytes(b"x" * 8192)
    with pytest.raises(SharedError, match=r"is not a shared-memory ring$"):
        Ring.open(ring_dir, "plain")
    ring = Ring.create(os.path.join(ring_dir, "real"), capacity=4096)
    os.symlink(os.path.join(ring_dir, "real"), os.path.join(ring_dir, "link"))
    with pytest.raises(SharedError, match="cannot be opened"):
        Ring.open(ring_dir, "link")  # never followed
    with pytest.raises(SharedError, match="not a shared-memory ring name"):
        Ring.open(ring_dir, "../real")
    with pytest.raises(SharedError, match="overruns"):
        ring.region(4000, 200)
    with pytest.raises(SharedError, match="overrun ring"):  # no buffer may wrap to the start
        ring.regions(Shared("real", 4032, ((64, KIND_BYTES), (64, KIND_BYTES))))
    with pytest.raises(FileExistsError):
        Ring.create(os.path.join(ring_dir, "real"))
    ring.close()


def _dead_drivers_dir(root: Path) -> Path:
    """A pool directory, with a ring file in it, named for a process that has exited."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_dir = root / f"bigpool-{int(dead.stdout)}-{'0' * 16}"
    dead_dir.mkdir()
    (dead_dir / "a1").write_bytes(b"left behind")
    return dead_dir


def test_stale_pool_directories_of_dead_drivers_are_swept(tmp_path: Path) -> None:
    dead_dir = _dead_drivers_dir(tmp_path)
    live_dir = make_pool_dir(str(tmp_path))  # this process's: kept
    other = tmp_path / "bigpool-not-ours"
    other.mkdir()
    assert sweep_stale_dirs(str(tmp_path)) == [str(dead_dir)]
    assert not dead_dir.exists() and os.path.isdir(live_dir) and other.exists()
    assert os.stat(live_dir).st_mode & 0o777 == 0o700


def test_a_directory_is_removed_as_orphaned_only_once_its_driver_is_gone(tmp_path: Path) -> None:
    dead_dir = _dead_drivers_dir(tmp_path)
    live_dir = make_pool_dir(str(tmp_path))  # this process is its driver
    other = tmp_path / "not-a-pool"
    other.mkdir()
    assert not remove_if_orphaned(live_dir) and os.path.isdir(live_dir)
    assert not remove_if_orphaned(str(other)) and other.exists()
    assert not remove_if_orphaned(str(tmp_path / "bigpool-1-missing"))
    assert remove_if_orphaned(str(dead_dir) + os.sep) and not dead_dir.exists()


# records ------------------------------------------------------------------------------------


def test_chunk_and_result_records_carry_a_shared_descriptor() -> None:
    shared = Shared("a1", 4096, ((8 * MiB, KIND_BYTES),))
    chunk = Chunk(7, b"f", None, b"pickle", False, False, (), shared)
    body = b"".join(bytes(p) for p in encode_chunk(chunk))[4:]
    back = decode_chunk(memoryview(body))
    assert back.shared == shared and bytes(back.args) == b"pickle" and back.buffers == ()
    with pytest.raises(ValueError, match="either in the record or shared"):
        encode_chunk(Chunk(7, b"f", None, b"p", False, False, (b"x",), shared))
    bad = bytearray(body)
    bad[0] |= 4  # buffers and shared at once
    with pytest.raises(RecordError, match="unknown flags"):
        decode_chunk(memoryview(bad))
    result = Result(9, OK, b"pickle", 123, 0.5, False, shared)
    back_result = decode_result(memoryview(b"".join(bytes(p) for p in encode_result(result))[4:]))
    assert back_result.shared == shared and bytes(back_result.payload) == b"pickle"
    truncated = b"".join(bytes(p) for p in encode_chunk(chunk))[4:20]
    with pytest.raises(RecordError):
        decode_chunk(memoryview(truncated))


# a worker's side ----------------------------------------------------------------------------


def echo(x: Any) -> Any:
    return x


def test_a_worker_reads_shared_arguments_and_places_large_results_in_its_ring(
        ring_dir: str) -> None:
    args_ring = Ring.create(os.path.join(ring_dir, "a1"), capacity=16 * MiB)
    big = os.urandom(2 * MiB)
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps([OutOfBand(big), b"small"], protocol=5, buffer_callback=buffers.append)
    shared = RingWriter(args_ring).put([b.raw() for b in buffers])
    assert shared is not None
    rings = SharedRings(ring_dir)
    record, ntasks = run_chunk(3, echo, data, False, False, (), shared, rings)
    assert ntasks == 2
    result = decode_result(memoryview(b"".join(bytes(p) for p in record))[4:])
    assert result.status == OK and result.shared is not None
    assert len(result.payload) < 200  # the 2 MiB are not in the record
    assert result.shared.buffers == ((2 * MiB, KIND_BYTES),)  # loads as itself, uncopied
    result_ring = Ring.open(ring_dir, result.shared.name, writable=True)
    values = pickle.loads(bytes(result.payload),
                          buffers=materialize(result_ring, result.shared))
    assert values == [big, b"small"] and type(values[0]) is bytes
    # Small results stay in the record; without a directory nothing is shared.
    record, _ = run_chunk(4, echo, pickle.dumps([b"x"]), False, False, (), None, rings)
    assert decode_result(memoryview(b"".join(bytes(p) for p in record))[4:]).shared is None
    record, _ = run_chunk(5, echo, data, False, False, (), shared, SharedRings(None))
    failed = decode_result(memoryview(b"".join(bytes(p) for p in record))[4:])
    assert failed.status != OK  # a task error naming why, not a crash
    result_ring.close()
    args_ring.close()


def test_a_machine_uses_the_directory_only_when_it_finds_the_probe(ring_dir: str) -> None:
    Path(ring_dir, "probe").write_text("token-1")
    assert PoolWorkerService(1, None, None, ring_dir, "token-1")._sees_shared_dir()
    assert not PoolWorkerService(1, None, None, ring_dir, "token-2")._sees_shared_dir()
    assert not PoolWorkerService(1, None, None, ring_dir + "-elsewhere",
                                 "token-1")._sees_shared_dir()
    assert not PoolWorkerService(1)._sees_shared_dir()
    # The configuration travels to the machine with the service.
    service = pickle.loads(pickle.dumps(PoolWorkerService(1, None, None, ring_dir, "token-1")))
    assert (service.shared_dir, service.shared_token) == (ring_dir, "token-1")


# pools --------------------------------------------------------------------------------------


def digest(data: bytes | bytearray) -> list[Any]:
    return [type(data).__name__, len(data), hashlib.sha256(data).hexdigest()]


def double_in_place(data: bytearray) -> bytes:
    data[:] = bytes(b ^ 0xFF for b in data[:16]) + data[16:]  # writable, as from the network
    return bytes(data)


def make_bytes(n: int) -> bytes:
    return bytes([n % 256]) * (2 * MiB)


def _ring_files(pool: BigPool) -> list[str]:
    assert pool._shared_dir is not None
    return sorted(os.listdir(pool._shared_dir))


@needs_dev_shm
@pytest.mark.parametrize("system", ["local", "test"])
def test_large_payloads_go_through_shared_memory_both_ways(system: str) -> None:
    payloads = [os.urandom(3 * MiB) for _ in range(6)]
    with BigPool(2, system=system) as pool:
        assert pool.map(echo, payloads, chunksize=1) == payloads
        directory = pool._shared_dir
        assert directory is not None and directory.startswith("/dev/shm/bigpool-")
        feeds = pool._scheduler.feeds
        assert all(f.arg_writer is not None for f in feeds)
        # Both machines' argument rings were written, and the results came through rings of
        # their workers (released again, so the workers can reuse the space).
        assert sum(f.arg_writer.total_placed > 0 for f in feeds if f.arg_writer) >= 1
        rings = [r for f in feeds for r in f.result_rings.values()]
        assert rings and all(r.released > 0 for r in rings)
        files = _ring_files(pool)
        assert "probe" in files and any(n.startswith("w") for n in files)
        assert pool.map(digest, [bytearray(payloads[0])]) == [digest(bytearray(payloads[0]))]
        assert pool.map(double_in_place, [bytearray(payloads[1])]) == [
            double_in_place(bytearray(payloads[1]))]
        assert pool.map(make_bytes, range(5)) == [make_bytes(n) for n in range(5)]
    assert not os.path.exists(directory)  # the pool's rings go with it


@needs_dev_shm
def test_without_shared_memory_payloads_still_arrive(monkeypatch: pytest.MonkeyPatch) -> None:
    payloads = [os.urandom(2 * MiB) for _ in range(3)]
    with BigPool(2, system="local", shared_memory=False) as pool:
        assert pool._shared_dir is None
        assert pool.map(echo, payloads, chunksize=1) == payloads
        assert all(f.arg_writer is None for f in pool._scheduler.feeds)
    monkeypatch.setenv("BIGPOOL_SHARED_MEMORY", "0")
    with BigPool(1, system="test") as pool:
        assert pool._shared_dir is None
        assert pool.map(echo, payloads[:1]) == payloads[:1]


@needs_dev_shm
def test_a_full_argument_ring_holds_chunks_back_and_oversized_ones_use_the_network(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A ring of 4 MiB holds two 1.5 MiB arguments at a time: the rest wait for room (the
    # results make it) and none is lost; a 6 MiB argument never fits and goes by the network.
    monkeypatch.setattr(pool_shm, "RING_CAPACITY", 4 * MiB)
    payloads = [os.urandom(3 * MiB // 2) for _ in range(12)] + [os.urandom(6 * MiB)]
    with BigPool(2, system="local") as pool:
        assert pool.map(digest, payloads, chunksize=1) == [digest(p) for p in payloads]
        feeds = pool._scheduler.feeds
        assert all(f.arg_writer is not None and f.arg_writer.ring.capacity == 4 * MiB
                   for f in feeds)
        assert all(f.arg_writer and f.arg_writer.placed_bytes == 0 for f in feeds)  # freed
        assert sum(f.arg_writer.total_placed for f in feeds if f.arg_writer) >= 12 * 3 * MiB // 2


@needs_dev_shm
def test_the_rings_of_exited_workers_are_removed() -> None:
    # One task per worker process: each new worker makes a result ring, which must go when
    # the worker exits, not pile up (each holds the memory of what it carried).
    with BigPool(1, system="local", maxtasksperchild=1) as pool:
        assert pool.map(make_bytes, range(6), chunksize=1) == [make_bytes(n) for n in range(6)]
        wait_until(lambda: sum(n.startswith("w") for n in _ring_files(pool)) <= 1, 20,
                   "the rings of exited workers to be removed")
        feed = pool._scheduler.feeds[0]
        assert len(feed.result_rings) <= 1


def hold(data: bytes, seconds: float) -> int:
    time.sleep(seconds)
    return len(data)


@needs_dev_shm
def test_space_held_up_behind_one_long_chunk_does_not_stall_the_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # One machine, two workers. A long call's argument sits at the start of the ring: the
    # space after it, freed as quick calls finish, cannot be reused past it. The quick calls
    # must go on (by the network) rather than wait for the long one.
    monkeypatch.setattr(pool_shm, "RING_CAPACITY", 8 * MiB)
    blobs = [os.urandom(3 * MiB // 2) for _ in range(24)]
    with BigPool(2, system=LocalSystem(maxprocs=2)) as pool:
        assert len(pool.machines) == 1
        pool.map(digest, blobs[:2])  # both workers up, the function known as quick
        long_call = pool.apply_async(hold, (blobs[0], 30.0))
        feed = pool._scheduler.feeds[0]
        wait_until(lambda: len(feed.in_flight) == 1, 10, "the long call to be sent")
        assert pool.map(digest, blobs, chunksize=1) == [digest(b) for b in blobs]
        assert not long_call.ready()
        assert feed.arg_writer is not None and feed.arg_writer.total_placed > 8 * MiB  # reused


@needs_dev_shm
def test_a_ring_that_empties_after_a_burst_gives_its_pages_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_shm, "KEEP_WARM", 64 * 1024)
    directory = make_pool_dir()
    try:
        ring = Ring.create(os.path.join(directory, "w1-00000000"), capacity=4 * MiB)
        writer = RingWriter(ring)

        def resident() -> int:
            return os.stat(ring.path).st_blocks * 512

        shared = writer.put([os.urandom(3 * MiB)])
        assert shared is not None and resident() >= 3 * MiB
        ring.release(shared.end)
        small = writer.put([b"next"])  # the ring was empty: the burst's pages go back
        assert small is not None and small.position % ring.capacity == 0
        assert resident() <= 64 * 1024 + 2 * 4096
        assert bytes(ring.region(small.position, 4)) == b"next"
        arena = ArenaWriter(Ring.create(os.path.join(directory, "a1"), capacity=4 * MiB))
        placed = [arena.put([os.urandom(MiB)]) for _ in range(3)]
        for region in placed:
            assert region is not None
            arena.free(region)
        assert os.stat(arena.ring.path).st_blocks * 512 <= 64 * 1024 + 2 * 4096
        ring.close()
        arena.ring.close()
    finally:
        pool_shm.remove_pool_dir(directory)


def test_a_worker_waits_a_little_for_room_in_its_result_ring(
        ring_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The driver frees a result's space when it reads it; a worker whose ring is full waits
    # for that rather than send the result over the network, but not for ever.
    monkeypatch.setattr(pool_shm, "RING_CAPACITY", 4 * MiB)
    rings = SharedRings(ring_dir)
    first = rings.place_result([bytes(3 * MiB)])
    assert first is not None
    ring = Ring.open(ring_dir, first[1].name, writable=True)
    releaser = threading.Timer(0.2, ring.release, (first[1].end,))
    releaser.start()
    started = time.monotonic()
    second = rings.place_result([os.urandom(3 * MiB)])
    releaser.join()
    assert second is not None and time.monotonic() - started >= 0.2
    monkeypatch.setattr("bigpool._worker_main.RESULT_ROOM_WAIT", 0.05)
    assert rings.place_result([bytes(3 * MiB)]) is None  # not released: the network it is
    ring.close()


def slow_digest(data: bytes) -> list[Any]:
    time.sleep(0.02)  # long enough that the killed machine holds some in flight
    return digest(data)


@needs_dev_shm
def test_a_killed_machine_loses_no_shared_payload_and_its_ring_is_dropped() -> None:
    from bigpool import KeepaliveConfig

    system = LocalSystem(keepalive=KeepaliveConfig(period=0.2, timeout=1.5, rpc_timeout=0.5))
    blobs = [os.urandom(MiB + n) for n in range(40)]
    with BigPool(3, system=system) as pool:
        wait_until(lambda: len(pool._scheduler.feeds) == 3
                   and all(f.arg_writer is not None for f in pool._scheduler.feeds), 30,
                   "three machines sharing memory")
        results: list[list[Any]] = []
        victim = None
        for i, value in enumerate(pool.imap(slow_digest, blobs, chunksize=1)):
            results.append(value)
            if i == 5:
                victim = next(f for f in pool._scheduler.feeds if f.in_flight)
                assert victim.arg_writer is not None
                ring_path = victim.arg_writer.ring.path
                system.kill(victim.machine, signal.SIGKILL)
        assert results == [digest(b) for b in blobs]  # each once, in order
        assert victim is not None and pool._scheduler.tasks_retried > 0
        assert victim.arg_writer is None and not os.path.exists(ring_path)
        assert pool.map(digest, blobs[:4]) == [digest(b) for b in blobs[:4]]


DRIVER_THEN_WAIT = """
import sys, time
from bigpool import BigPool, KeepaliveConfig
from bigpool.systems.local import LocalSystem
system = LocalSystem(keepalive=KeepaliveConfig(period=0.2, timeout=1.5, rpc_timeout=0.5))
pool = BigPool(1, system=system)
pool.map(len, [bytes(2 * 1024 * 1024)] * 4)
print(pool._shared_dir, flush=True)
time.sleep(120)
"""


@needs_dev_shm
def test_a_killed_drivers_directory_goes_with_its_orphaned_machines() -> None:
    import psutil

    driver = subprocess.Popen([sys.executable, "-c", DRIVER_THEN_WAIT], stdout=subprocess.PIPE,
                              text=True)
    machines: list[psutil.Process] = []
    try:
        assert driver.stdout is not None
        directory = driver.stdout.readline().strip()
        assert directory.startswith("/dev/shm/bigpool-") and os.path.isdir(directory)
        assert any(n.startswith("a") for n in os.listdir(directory))  # rings in use
        machines = psutil.Process(driver.pid).children(recursive=True)
        driver.kill()
        driver.wait(10)
        # Its machines exit by themselves once keepalives stop, and their workers, finding
        # the driver gone, remove its rings: no pool has to start on this host for that.
        wait_until(lambda: not any(m.is_running() and m.status() != psutil.STATUS_ZOMBIE
                                   for m in machines), 20, "the orphaned machines to exit")
        wait_until(lambda: not os.path.exists(directory), 10,
                   "the orphaned workers to remove the killed driver's directory")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)
        for m in machines:
            with contextlib.suppress(psutil.Error):
                m.kill()
        if driver.stdout is not None:
            driver.stdout.close()
