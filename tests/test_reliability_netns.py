"""Reliability over hosts of our own: machines in network namespaces, killed, cut off, starved.

Each test builds its hosts (``netns_support.Hosts``: namespaces on a bridge, the driver in the
root namespace), runs a pool on the ``netns`` system, breaks something, and checks that no
result is lost or doubled and that no process is left on any host. Figures (detection time
against the keepalive timeout, time to recover) are recorded with ``reliability_support.record``
for docs/reliability.md. Needs root (skips with the reason otherwise).

The namespaces share this host's ``/dev/shm``, so a pool would find its machines on the
driver's host and send them records over a Unix socket and large payloads through shared
memory, around the network under test: every pool here is made with ``shared_memory=False``.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loop_support import expected_loop_name
from netns_support import Hosts, hosts, memory_cgroup, netem_unavailable, wait_gone
from pool_support import wait_until
from reliability_support import record, soak_long
from reliability_tasks import Probe, allocate, square_slowly, square_where

from bigpool import BigPool, KeepaliveConfig, Machine, NetworkError, State, TaskLostError
from bigpool.systems.netns import NetnsHost, NetnsSystem, listen_in_netns

KEEPALIVE = KeepaliveConfig(period=0.5, timeout=3.0, rpc_timeout=1.0)
# Everything on a host must be gone this long after its pool: shutdown's own grace, and more.
EXIT_WAIT = 15.0


@pytest.fixture
def three_hosts() -> Iterator[Hosts]:
    with hosts(3) as built:
        yield built


def _all_pids(built: Hosts) -> list[int]:
    return [pid for pids in built.processes().values() for pid in pids]


def _assert_nothing_left(built: Hosts) -> None:
    wait_gone(_all_pids(built), EXIT_WAIT)
    assert _all_pids(built) == []


def _system(built: Hosts, **options: object) -> NetnsSystem:
    return NetnsSystem([h.netns_host for h in built.hosts], keepalive=KEEPALIVE, **options)


class StopWatch:
    """When a machine reaches STOPPED, seen from a thread that waits on it."""

    def __init__(self, machine: Machine) -> None:
        self.stopped_at: float | None = None
        self._thread = threading.Thread(target=self._watch, args=(machine,), daemon=True)
        self._thread.start()

    def _watch(self, machine: Machine) -> None:
        machine.wait(State.STOPPED)
        self.stopped_at = time.monotonic()


def test_sigkill_one_machine_mid_map_every_result_once(three_hosts: Hosts) -> None:
    system = _system(three_hosts)
    with BigPool(3, system=system, shared_memory=False) as pool:
        victim = pool.machines[0]
        victim.wait(State.RUNNING, 60)
        assert victim.call("Supervisor.info", timeout=30)["event_loop"] == expected_loop_name()
        watch = StopWatch(victim)
        results: list[int] = []
        killed_at = None
        started = time.monotonic()
        for value in pool.imap_unordered(square_slowly, range(10_000), chunksize=10):
            results.append(value)
            if len(results) == 3_000:
                killed_at = time.monotonic()
                system.kill(victim)
        finished = time.monotonic()
        assert killed_at is not None
        counts = collections.Counter(results)
        assert set(counts) == {x * x for x in range(10_000)}
        assert max(counts.values()) == 1
        wait_until(lambda: watch.stopped_at is not None, 10, "the killed machine to stop")
        assert watch.stopped_at is not None
        detection = watch.stopped_at - killed_at
        assert detection < KEEPALIVE.timeout
        assert "SIGKILL" in str(victim.err())
        assert pool.map(square_slowly, range(100)) == [x * x for x in range(100)]
    _assert_nothing_left(three_hosts)
    record("1 sigkill machine mid map", tasks=10_000, detection_s=round(detection, 3),
           keepalive_timeout_s=KEEPALIVE.timeout, map_s=round(finished - started, 2),
           after_kill_s=round(finished - killed_at, 2), lost=0, duplicated=0, processes_left=0)


@pytest.mark.parametrize("frozen", [False, True], ids=["link-down", "link-down-host-frozen"])
def test_host_cut_off_fails_calls_within_timeout_and_reschedules(
    three_hosts: Hosts, frozen: bool
) -> None:
    """The link goes down; with ``frozen`` the machine is also stopped (SIGSTOP), as a host that
    lost power: its process cannot exit, so only the driver's keepalives can find it gone."""
    system = _system(three_hosts)
    with BigPool(3, system=system, services={"Probe": Probe()}, shared_memory=False) as pool:
        for m in pool.machines:
            m.wait(State.RUNNING, 60)
        victim = pool.machines[0]
        victim_host = next(h for h in three_hosts.hosts if h.address == victim.hostname)
        victim_pid = victim.call("Probe.pid")
        hosts_seen: collections.Counter[str] = collections.Counter()
        results: list[int] = []
        call_outcome: list[tuple[float, BaseException | object]] = []
        cut_at = 0.0

        def call_the_cut_host() -> None:
            try:
                outcome: BaseException | object = victim.call("Probe.echo", "hello")
            except BaseException as exc:
                outcome = exc
            call_outcome.append((time.monotonic(), outcome))

        caller = threading.Thread(target=call_the_cut_host, daemon=True)
        for value, where in pool.imap_unordered(square_where, range(600)):
            results.append(value)
            hosts_seen[where] += 1
            if len(results) == 60:
                three_hosts.cut(victim_host)
                if frozen:
                    system.kill(victim, signal.SIGSTOP)
                cut_at = time.monotonic()
                caller.start()
        map_done_after = time.monotonic() - cut_at
        caller.join(KEEPALIVE.timeout + KEEPALIVE.rpc_timeout + 10)
        assert call_outcome, "a call to the cut-off host hung"
        failed_at, outcome = call_outcome[0]
        assert isinstance(outcome, NetworkError), outcome
        failed_after = failed_at - cut_at
        # Keepalives fail for the timeout; the last good one was at most a period before.
        assert failed_after <= KEEPALIVE.timeout + KEEPALIVE.rpc_timeout + KEEPALIVE.period + 1
        assert victim.state is State.STOPPED
        # Either side may notice first: the driver's keepalives failing for the timeout
        # (NetworkError), or the machine's watchdog exiting for want of them, seen through its
        # process (KeepaliveExpiredError, also a NetworkError).
        assert isinstance(victim.err(), NetworkError), victim.err()
        error_name = type(victim.err()).__name__
        if frozen:
            assert "keepalives failed" in str(victim.err())
            assert failed_after >= KEEPALIVE.timeout - KEEPALIVE.period - 0.1
        assert sorted(results) == [x * x for x in range(600)]
        assert len(hosts_seen) == 3  # the cut host did work before the cut
        if frozen:
            system.kill(victim, signal.SIGCONT)
        # The cut-off machine hears no keepalive and ends itself: the driver cannot reach it.
        wait_gone([victim_pid], KEEPALIVE.timeout + 5)
        gone_after = time.monotonic() - cut_at
        assert pool.map(square_slowly, range(100)) == [x * x for x in range(100)]
    _assert_nothing_left(three_hosts)
    record("2 host cut off" + (", host frozen" if frozen else ""),
           detection_s=round(failed_after, 2), machine_error=error_name,
           keepalive_timeout_s=KEEPALIVE.timeout, machine_exited_after_cut_s=round(gone_after, 2),
           map_done_after_cut_s=round(map_done_after, 2),
           lost=0, processes_left=0)


DRIVER_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from bigpool import BigPool, KeepaliveConfig, State
    from bigpool.systems.netns import NetnsHost, NetnsSystem
    hosts = [NetnsHost(*h) for h in json.loads(sys.argv[1])]
    system = NetnsSystem(hosts, keepalive=KeepaliveConfig(period=0.5, timeout=3.0, rpc_timeout=1.0))
    pool = BigPool(len(hosts), system=system, shared_memory=False)
    for m in pool.machines:
        m.wait(State.RUNNING, 60)
    pending = pool.map_async(time.sleep, [0.05] * 100_000)
    time.sleep(0.5)  # let the workers take tasks: the machines are busy when the driver dies
    print(json.dumps([m.pid for m in pool.machines]), flush=True)
    time.sleep(600)
""")


def test_sigkilled_driver_leaves_nothing_on_any_host(three_hosts: Hosts) -> None:
    spec = json.dumps([[h.netns, h.address] for h in three_hosts.hosts])
    driver = subprocess.Popen([sys.executable, "-c", DRIVER_SCRIPT, spec],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout is not None
        line = driver.stdout.readline()
        machine_pids = json.loads(line)
        per_host = three_hosts.processes()
        # Every host runs its machine and that machine's worker.
        assert all(len(pids) >= 2 for pids in per_host.values()), per_host
        assert set(machine_pids) <= set(_all_pids(three_hosts))
        pids = _all_pids(three_hosts)
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        killed_at = time.monotonic()
        # Each machine's watchdog fires at most the timeout after the last keepalive it got;
        # its workers follow it out.
        machines_gone_after = wait_gone(machine_pids, KEEPALIVE.timeout + 5)
        wait_gone(pids, 5)
        gone_after = time.monotonic() - killed_at
        assert machines_gone_after <= KEEPALIVE.timeout + 0.5
        assert gone_after <= KEEPALIVE.timeout + 2
        assert _all_pids(three_hosts) == []
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        if driver.stdout is not None:
            driver.stdout.close()
    record("3 sigkill driver", processes=len(pids),
           machines_exited_s=round(machines_gone_after, 2), all_exited_s=round(gone_after, 2),
           keepalive_timeout_s=KEEPALIVE.timeout, processes_left=0)


def test_machine_out_of_memory_is_named_and_pool_carries_on(three_hosts: Hosts) -> None:
    limit = 256 * 1024 * 1024
    tag = three_hosts.tag
    with memory_cgroup(f"{tag}m0", limit) as cg0, memory_cgroup(f"{tag}m1", limit) as cg1:
        limited = [NetnsHost(h.netns, h.address, cg)
                   for h, cg in zip(three_hosts.hosts, (cg0, cg1), strict=False)]
        system = NetnsSystem(limited, keepalive=KEEPALIVE)
        with BigPool(2, system=system, retries=1, shared_memory=False) as pool:
            for m in pool.machines:
                m.wait(State.RUNNING, 60)
            hog = pool.apply_async(allocate, (4 * limit,))
            others = pool.map_async(square_where, range(200), chunksize=1)
            started = time.monotonic()
            with pytest.raises(TaskLostError) as info:
                hog.get(120)
            named_after = time.monotonic() - started
            assert info.value.oom, str(info.value)
            assert "OOM" in str(info.value)
            assert sorted(v for v, _ in others.get(120)) == [x * x for x in range(200)]
            assert all(m.state is State.RUNNING for m in pool.machines)
            assert pool.map(square_slowly, range(100)) == [x * x for x in range(100)]
        _assert_nothing_left(three_hosts)
    record("4 out of memory", limit_mib=limit >> 20, error=str(info.value).splitlines()[0],
           error_after_s=round(named_after, 2), machines_running_after=2, processes_left=0)


class ProxiedSlowHost(NetnsSystem):
    """The netns system, with the machines of host ``slow`` behind ``delay_proxy.py``: the
    stand-in for ``tc netem`` where the kernel has no sch_netem. Each such machine listens on
    127.0.0.1 inside its namespace; the proxy takes the host's address and the same port, so
    the driver dials (and verifies) the machine's usual address."""

    def __init__(self, hosts: list[NetnsHost], slow: NetnsHost, delay: float,
                 **options: object) -> None:
        super().__init__(hosts, **options)  # type: ignore[arg-type]
        self.slow = slow
        self.delay = delay
        self.proxies: list[subprocess.Popen[str]] = []

    def _listen(self) -> tuple[socket.socket, str]:
        sock, address = super()._listen()
        if address != self.slow.address:
            return sock, address
        sock.close()
        inner = listen_in_netns(NetnsHost(self.slow.netns, "127.0.0.1"))
        port = str(inner.getsockname()[1])
        proxy = subprocess.Popen(
            [sys.executable, "-m", "bigpool.systems.netns", self.slow.netns, sys.executable,
             str(Path(__file__).with_name("delay_proxy.py")), address, port, "127.0.0.1", port,
             str(self.delay)],
            stdout=subprocess.PIPE, text=True,
        )
        self.proxies.append(proxy)
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        return inner, address

    def slow_down(self) -> None:
        for proxy in self.proxies:
            proxy.send_signal(signal.SIGUSR1)

    def stop_proxies(self) -> None:
        for proxy in self.proxies:
            proxy.kill()
            proxy.wait()
            if proxy.stdout is not None:
                proxy.stdout.close()


def test_slow_host_does_not_dominate_the_map(three_hosts: Hosts) -> None:
    slow = three_hosts.hosts[0]
    delay_ms = 200
    netem_missing = netem_unavailable(slow.netns, slow.inner_dev)
    if netem_missing is None:
        system: NetnsSystem = _system(three_hosts)
        how = "tc netem"
    else:
        system = ProxiedSlowHost([h.netns_host for h in three_hosts.hosts], slow.netns_host,
                                 delay_ms / 1000, keepalive=KEEPALIVE)
        how = "delay proxy (no sch_netem: " + netem_missing.split(":")[0] + ")"
    try:
        with BigPool(3, system=system, shared_memory=False) as pool:
            for m in pool.machines:
                m.wait(State.RUNNING, 60)
            tasks = 300
            pool.map(square_where, range(30), chunksize=1)  # warm: timings known
            started = time.monotonic()
            baseline = pool.map(square_where, range(tasks), chunksize=1)
            fast_s = time.monotonic() - started
            if isinstance(system, ProxiedSlowHost):
                system.slow_down()
            else:
                three_hosts.delay(slow, delay_ms)
            (on_slow,) = [m for m in pool.machines if system.host_of(m).netns == slow.netns]
            started = time.monotonic()
            on_slow.call("Supervisor.info", None, timeout=10)
            assert time.monotonic() - started >= delay_ms / 1000 * 0.95  # the delay is real
            started = time.monotonic()
            slowed = pool.map(square_where, range(tasks), chunksize=1)
            slowed_s = time.monotonic() - started
            assert [v for v, _ in slowed] == [v for v, _ in baseline]
            share = collections.Counter(where for _, where in slowed)
            slow_share = share[f"net:[{os.stat(f'/var/run/netns/{slow.netns}').st_ino}]"]
            # Round robin would give the slow host a third of the tasks at 200 ms or more
            # each: the map would take that long. Work must go where it finishes first: the
            # map takes about what the two fast hosts alone would (1.5 x the baseline).
            round_robin_s = tasks / 3 * delay_ms / 1000
            fast_hosts_alone_s = fast_s * 1.5
            assert slowed_s < 2 * fast_hosts_alone_s + 1, (slowed_s, fast_s, share)
            assert slow_share < tasks / 3
    finally:
        if isinstance(system, ProxiedSlowHost):
            system.stop_proxies()
    _assert_nothing_left(three_hosts)
    record("5 one host 200 ms slower", how=how, tasks=tasks, task_ms=20,
           unslowed_s=round(fast_s, 2), slowed_s=round(slowed_s, 2),
           two_fast_hosts_alone_s=round(fast_hosts_alone_s, 2), round_robin_would_take_s=round_robin_s,
           tasks_on_slow_host=slow_share, processes_left=0)


def test_soak_machines_killed_and_replaced(three_hosts: Hosts) -> None:
    long = soak_long()
    tasks = 100_000 if long else 20_000
    kill_every = 3.0 if long else 1.0
    system = _system(three_hosts)
    with BigPool(3, system=system, retries=20, shared_memory=False) as pool:
        for m in pool.machines:
            m.wait(State.RUNNING, 60)
        done = threading.Event()
        kills: list[str] = []

        def killer() -> None:
            while not done.wait(kill_every):
                running = [m for m in pool.machines if m.state is State.RUNNING]
                if len(running) < 2:
                    continue  # wait for the replacements to boot
                victim = running[len(kills) % len(running)]
                system.kill(victim)
                kills.append(victim.addr)
                pool.add_machines(1)

        thread = threading.Thread(target=killer, daemon=True)
        started = time.monotonic()
        thread.start()
        try:
            results = pool.map(square_slowly, range(tasks), chunksize=5)
        finally:
            done.set()
            thread.join(30)
        elapsed = time.monotonic() - started
        assert results == [x * x for x in range(tasks)]
        assert len(kills) >= 2, kills
        # Every killed machine was replaced: the pool is back to three.
        wait_until(lambda: sum(m.state is State.RUNNING for m in pool.machines) == 3
                   and sum(m.state is State.STOPPED for m in pool.machines) == len(kills),
                   60, "the killed machines to stop and their replacements to boot")
        assert pool.map(square_slowly, range(100)) == [x * x for x in range(100)]
    _assert_nothing_left(three_hosts)
    record("6 soak" + (" (long)" if long else " (short)"), tasks=tasks, machines_killed=len(kills),
           kill_every_s=kill_every, elapsed_s=round(elapsed, 1), wrong=0, lost=0,
           processes_left=0)


def test_short_partition_loses_no_machine(three_hosts: Hosts) -> None:
    """A link down for less than the keepalive timeout costs time, not machines or results."""
    system = _system(three_hosts)
    with BigPool(3, system=system, shared_memory=False) as pool:
        for m in pool.machines:
            m.wait(State.RUNNING, 60)
        victim = pool.machines[0]
        victim_host = next(h for h in three_hosts.hosts if h.address == victim.hostname)
        victim_ns = f"net:[{os.stat(f'/var/run/netns/{victim_host.netns}').st_ino}]"
        healed_at: list[float] = []

        def heal() -> None:
            three_hosts.heal(victim_host)
            healed_at.append(time.monotonic())

        results = []
        from_victim_after_heal = 0
        for value, where in pool.imap_unordered(square_where, range(300)):
            results.append(value)
            if healed_at and where == victim_ns:
                from_victim_after_heal += 1
            if len(results) == 30:
                three_hosts.cut(victim_host)
                healer = threading.Timer(KEEPALIVE.timeout / 3, heal)
                healer.start()
        healer.join()
        assert sorted(results) == [x * x for x in range(300)]
        assert all(m.state is State.RUNNING for m in pool.machines), pool.machines
        # The cut-off machine's work was held, not lost: it came back over the healed link.
        assert from_victim_after_heal >= 1
    _assert_nothing_left(three_hosts)
    record("2b short partition", cut_s=KEEPALIVE.timeout / 3, keepalive_timeout_s=KEEPALIVE.timeout,
           machines_lost=0, results_from_cut_host_after_heal=from_victim_after_heal, lost=0,
           processes_left=0)


CRASHING_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from netns_support import Hosts
    hosts = Hosts(2).__enter__()
    print(" ".join(h.netns for h in hosts.hosts), hosts.bridge, flush=True)
    time.sleep(600)
""")


def test_leftovers_of_a_crashed_run_are_removed() -> None:
    from netns_support import remove_leftovers, skip_unless_netns

    skip_unless_netns()
    run = subprocess.Popen([sys.executable, "-c", CRASHING_RUN, str(Path(__file__).parent)],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout is not None
        *namespaces, bridge = run.stdout.readline().split()
        assert all(os.path.exists(f"/var/run/netns/{ns}") for ns in namespaces)
    finally:
        run.kill()
        run.wait()
        if run.stdout is not None:
            run.stdout.close()
    removed = remove_leftovers()
    assert set(namespaces) | {bridge} <= set(removed)
    assert not any(os.path.exists(f"/var/run/netns/{ns}") for ns in namespaces)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert bridge not in links
