"""Bad arguments at the API, and secrets kept out of logs, environments and command lines.

Each bad call must raise an error that names the problem, and the pool or machine it was made
on must go on working. (Unpicklable arguments and results through AsyncResults are also in the
conformance suites, against the stdlib's behaviour.)
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator

import pytest
from pool_support import wait_until
from reliability_tasks import Probe, square_slowly

import bigpool
from bigpool import BigPool, BigPoolExecutor, State
from bigpool.h2rpc import BadRequestError, MethodNotFoundError
from bigpool.h2rpc.authority import _pem_key


def closure_over_a_generator() -> object:
    numbers = (i for i in range(3))

    def next_number(x: int) -> int:
        return next(numbers, x)

    return next_number


@pytest.fixture(scope="module")
def pool() -> Iterator[BigPool]:
    with BigPool(2, system="local", services={"Probe": Probe()}) as p:
        for m in p.machines:
            m.wait(State.RUNNING, 60)
        yield p


def _still_works(pool: BigPool) -> None:
    assert pool.map(square_slowly, range(20)) == [x * x for x in range(20)]
    for m in pool.machines:
        assert m.state is State.RUNNING
        assert m.call("Probe.echo", "ok") == "ok"


def test_unpicklable_function_is_named(pool: BigPool) -> None:
    func = closure_over_a_generator()
    with pytest.raises(TypeError, match="generator") as info:
        pool.map(func, [1, 2])  # type: ignore[arg-type]
    notes = getattr(info.value, "__notes__", None) or ["(3.10: no notes) next_number cannot be pickled"]
    assert any("next_number cannot be pickled" in note for note in notes)
    with pytest.raises(TypeError, match="generator"):
        pool.apply(func, (1,))  # type: ignore[arg-type]
    _still_works(pool)


def test_unpicklable_argument_is_named(pool: BigPool) -> None:
    lock_free_generator = (i for i in range(3))
    with pytest.raises(TypeError, match="generator") as info:
        pool.apply(abs, (lock_free_generator,))
    notes = getattr(info.value, "__notes__", None) or ["(3.10: no notes) arguments cannot be pickled"]
    assert any("arguments cannot be pickled" in note for note in notes)
    _still_works(pool)


def test_missing_service_or_method_is_named(pool: BigPool) -> None:
    m = pool.machines[0]
    with pytest.raises(MethodNotFoundError, match=r"no service 'Nowhere'.*Probe"):
        m.call("Nowhere.echo", 1)
    with pytest.raises(MethodNotFoundError, match="service 'Probe' has no method 'nope'"):
        m.call("Probe.nope", 1)
    with pytest.raises(BadRequestError, match=r"not of the form Service\.method"):
        m.call("nodot", 1)
    with pytest.raises(MethodNotFoundError, match="_private"):
        m.call("Probe._private", 1)
    _still_works(pool)


def test_bad_task_arguments_to_pool_methods_are_named(pool: BigPool) -> None:
    with pytest.raises(ValueError, match="Chunksize must be 1"):
        pool.map(abs, [1], chunksize=0)
    with pytest.raises(TypeError, match="not callable"):
        pool.apply(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not iterable"):
        pool.map(abs, 5)  # type: ignore[arg-type]
    _still_works(pool)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"processes": 0}, ValueError, "Number of processes must be at least 1"),
        ({"processes": -3}, ValueError, "Number of processes must be at least 1"),
        ({"processes": "2"}, TypeError, "processes must be an integer, not str"),
        ({"processes": 2.5}, TypeError, "processes must be an integer, not float"),
        ({"system": "nowhere"}, ValueError, "unknown system 'nowhere'; known systems: .*local"),
        ({"system": 123}, TypeError, "system must be a name or a System, not int"),
        ({"retries": -1}, ValueError, "retries must be a non-negative integer"),
        ({"initializer": 5}, TypeError, "initializer must be a callable"),
        ({"maxtasksperchild": 0}, ValueError, "maxtasksperchild must be a positive int"),
        ({"maxprocs": 0}, ValueError, "maxprocs must be a positive integer, not 0"),
        ({"bogus_option": 1}, TypeError, "bogus_option"),
        ({"services": {"a.b": Probe()}}, ValueError, "service name 'a.b'"),
        ({"services": {"BigPoolWorker": Probe()}}, ValueError, "used by BigPool"),
        ({"services": {"Bad": threading.local()}}, TypeError, "service 'Bad'.*cannot be pickled"),
    ],
)
def test_bad_pool_arguments_are_named_and_leave_nothing_running(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    options: dict[str, object] = {"processes": 1, "system": "local", **kwargs}
    before = _machine_processes()
    with pytest.raises(error, match=match):
        BigPool(**options)  # type: ignore[arg-type]
    wait_until(lambda: _machine_processes() <= before, 15, "no machine left by a bad BigPool")


def test_bad_executor_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        BigPoolExecutor(0, system="test")
    with pytest.raises(ValueError, match="unknown system"):
        BigPoolExecutor(1, system="nowhere")
    with BigPoolExecutor(1, system="test") as executor:
        with pytest.raises(TypeError, match="generator"):
            executor.submit(closure_over_a_generator(), 1).result(30)
        assert executor.submit(abs, -3).result(30) == 3


def _machine_processes() -> set[int]:
    import psutil

    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if "bigpool.node" in cmdline and proc.status() != psutil.STATUS_ZOMBIE:
            found.add(proc.pid)
    return found


# secrets -------------------------------------------------------------------------------------


class Noisy:
    def fail(self, _: object) -> None:
        import sys

        print("noisy: about to fail", flush=True)
        print("noisy: on stderr", file=sys.stderr, flush=True)
        raise RuntimeError("a service failure, logged with its traceback")

    def crash(self, _: object) -> None:
        os._exit(7)


def test_no_private_key_in_output_logs_environment_or_command_line(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with bigpool.start("local") as b:
        keys = [b.credentials.key_pem, _pem_key(b.authority._key)]
        machines = b.start(2, services={"Noisy": Noisy()})
        for m in machines:
            m.wait(State.RUNNING, 60)
        exposed = []
        for m in machines:
            assert m.pid is not None
            with open(f"/proc/{m.pid}/environ", "rb") as f:
                exposed.append(f.read())
            with open(f"/proc/{m.pid}/cmdline", "rb") as f:
                exposed.append(f.read())
        with pytest.raises(RuntimeError):
            machines[0].call("Noisy.fail", None)
        with pytest.raises(bigpool.BigpoolError):
            machines[1].call("Noisy.crash", None)
        wait_until(lambda: machines[1].state is State.STOPPED, 15, "the crashed machine to stop")
    out, err = capfd.readouterr()
    texts = [out.encode(), err.encode(), caplog.text.encode(), *exposed]
    # The machines' output was captured, so the checks below look at something.
    assert "noisy: about to fail" in out and "noisy: on stderr" in err
    for text in texts:
        assert b"PRIVATE KEY" not in text
        for key in keys:
            body = b"".join(key.splitlines()[1:-1])
            assert body[:64] not in text.replace(b"\n", b"")


# replacing machines ------------------------------------------------------------------------


def test_add_machines_replaces_a_lost_machine() -> None:
    from bigpool import BrokenExecutor, KeepaliveConfig
    from bigpool.systems.test import TestSystem

    system = TestSystem(keepalive=KeepaliveConfig(period=0.2, timeout=1.5, rpc_timeout=0.5))
    with BigPool(2, system=system, services={"Probe": Probe()}) as pool:
        first, other = pool.machines
        first.wait(State.RUNNING, 30)
        system.kill(first)
        wait_until(lambda: first.state is State.STOPPED, 10, "the killed machine to stop")
        (replacement,) = pool.add_machines(1)
        assert pool.machines == [first, other, replacement]
        replacement.wait(State.RUNNING, 30)
        assert replacement.call("Probe.echo", "replaced") == "replaced"
        system.kill(other)
        wait_until(lambda: other.state is State.STOPPED, 10, "the other machine to stop")
        # Only the replacement is left to do the work.
        assert pool.map(square_slowly, range(50)) == [x * x for x in range(50)]
        # With every machine gone the pool is broken, as the stdlib's would be, for good.
        system.kill(replacement)
        wait_until(lambda: pool._broken is not None, 10, "the pool to break")
        with pytest.raises(BrokenExecutor, match="every machine of the pool is gone"):
            pool.add_machines(1)
    with pytest.raises(ValueError, match="Pool not running"):
        pool.add_machines(1)
