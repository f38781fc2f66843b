"""Systems: where machines come from. One small interface, a registry by name.

A system starts machines and says how to keep them alive; the machine layer does the rest
(booting, registering services, keepalives, calls). Implementations live one per module:
``local`` (Unix processes on this host, the default), ``test`` (in-process), ``netns``
(processes in Linux network namespaces, for tests over real interfaces), and others.
Names are resolved lazily, so an optional system's dependencies (boto3 for EC2) load only
when it is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..machine import B, Machine

__all__ = ["KeepaliveConfig", "System", "get_system", "register_system", "system_names"]


@dataclass(frozen=True)
class KeepaliveConfig:
    """How the driver keeps a machine alive, and how soon a silent machine is given up.

    ``period``: seconds between keepalives. ``timeout``: a machine whose keepalives have
    failed for this long is lost (its calls fail, it goes to STOPPED), and a machine that has
    heard no keepalive for this long exits by itself. ``rpc_timeout``: the bound on one
    keepalive call.
    """

    period: float = 5.0
    timeout: float = 30.0
    rpc_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in ("period", "timeout", "rpc_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0:
                raise ValueError(f'keepalive "{name}" must be a positive number, not {value!r}')
        if self.period >= self.timeout:
            raise ValueError(
                f"keepalive period ({self.period}s) must be shorter than its timeout "
                f"({self.timeout}s), or one late keepalive would lose the machine"
            )


@runtime_checkable
class System(Protocol):
    """What a system provides. Implementations must tolerate ``shutdown`` being called twice."""

    name: str

    def init(self, b: B) -> None:
        """Prepare to start machines for ``b`` (called once, on the driver)."""

    async def start(self, b: B, count: int) -> list[Machine]:
        """Launch ``count`` machines; they may still be booting (state UNSTARTED) on return."""

    def keepalive_config(self) -> KeepaliveConfig:
        """The keepalive timings for machines of this system."""

    def maxprocs(self) -> int:
        """Processors per machine (worker slots a machine offers)."""

    def needs_bundle(self) -> bool:
        """Whether machines must receive the driver's code bundle (setbinary + exec)."""

    async def shutdown(self) -> None:
        """Stop every machine this system started and free what it holds."""


_FACTORIES: dict[str, Callable[..., System] | str] = {
    "local": "bigpool.systems.local:LocalSystem",
    "test": "bigpool.systems.test:TestSystem",
    "netns": "bigpool.systems.netns:NetnsSystem",
    "ec2": "bigpool.systems.ec2:EC2System",
}


def register_system(name: str, factory: Callable[..., System]) -> None:
    """Make ``factory`` (a System class or function) available as ``system=name``."""
    _FACTORIES[name] = factory


def system_names() -> list[str]:
    return sorted(_FACTORIES)


def get_system(name: str, **kwargs: Any) -> System:
    """A new system of the given name. ``ValueError`` naming the known systems if unknown."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown system {name!r}; known systems: {', '.join(system_names())}")
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"system {name!r} is not available here: {exc}") from exc
        factory = getattr(module, attr)
        _FACTORIES[name] = factory
    return factory(**kwargs)
