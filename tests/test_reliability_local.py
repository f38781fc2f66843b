"""Machine loss on the local system, without root: a machine frozen with SIGSTOP looks, to the
driver, like a host cut off (its connections stay open and silent). Its loss must be declared
within the keepalive timeout and its work rescheduled at once, not after a TLS close timeout.
"""

from __future__ import annotations

import signal
import threading
import time

import psutil
from pool_support import wait_until
from reliability_support import record
from reliability_tasks import square_where

from bigpool import BigPool, KeepaliveConfig, NetworkError, State
from bigpool.systems.local import LocalSystem

KEEPALIVE = KeepaliveConfig(period=0.3, timeout=2.0, rpc_timeout=0.5)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_frozen_machine_is_lost_within_the_timeout_and_its_tasks_rescheduled() -> None:
    system = LocalSystem(keepalive=KEEPALIVE)
    with BigPool(2, system=system) as pool:
        victim, other = pool.machines
        for m in pool.machines:
            m.wait(State.RUNNING, 60)
        assert victim.pid is not None
        results: list[int] = []
        frozen_at = 0.0
        stopped_at: list[float] = []
        watcher = threading.Thread(
            target=lambda: (victim.wait(State.STOPPED), stopped_at.append(time.monotonic())),
            daemon=True,
        )
        watcher.start()
        try:
            # Few tasks after the freeze: the other machine is soon done with the rest, and
            # what remains is the frozen machine's work, waiting for its loss to be declared.
            for value, _ in pool.imap_unordered(square_where, range(60)):
                results.append(value)
                if len(results) == 30:
                    system.kill(victim, signal.SIGSTOP)
                    frozen_at = time.monotonic()
            done_after = time.monotonic() - frozen_at
            assert sorted(results) == [x * x for x in range(60)]
            assert victim.state is State.STOPPED
            assert isinstance(victim.err(), NetworkError), victim.err()
            assert "keepalives failed" in str(victim.err())
            # Lost after the timeout (less the time since the last keepalive got through);
            # what it held ran on the other machine at once (not after a 30 s TLS close).
            assert done_after < KEEPALIVE.timeout + 3, done_after
            watcher.join(10)
            detection = stopped_at[0] - frozen_at
            # Declared lost the timeout after the last keepalive that got through was sent,
            # which was at most a period before the freeze (plus scheduling on a busy box).
            assert KEEPALIVE.timeout - KEEPALIVE.period - 0.1 <= detection, detection
            assert detection <= KEEPALIVE.timeout + KEEPALIVE.rpc_timeout, detection
        finally:
            system.kill(victim, signal.SIGCONT)
        # Thawed, the machine finds its keepalive deadline long past and exits by itself.
        wait_until(lambda: _gone(victim.pid), 10, "the thawed machine to exit")
        assert other.state is State.RUNNING
    record("frozen local machine (SIGSTOP)", detection_s=round(detection, 2),
           keepalive_timeout_s=KEEPALIVE.timeout, map_done_after_freeze_s=round(done_after, 2),
           lost=0)


def test_keepalive_expired_error_is_a_network_error_that_keeps_its_details() -> None:
    from bigpool.node import EXIT_NO_KEEPALIVE
    from bigpool.systems.local import KeepaliveExpiredError, MachineExitedError

    err = KeepaliveExpiredError("https://10.0.0.2:1/", EXIT_NO_KEEPALIVE, ["no keepalive\n"])
    assert isinstance(err, NetworkError) and isinstance(err, MachineExitedError)
    assert err.temporary
    assert err.addr == "https://10.0.0.2:1/" and err.returncode == EXIT_NO_KEEPALIVE
    assert "exited with code 3" in str(err) and "no keepalive" in str(err)
