"""The pickle of a task's function is reused until something it was made from is rebound."""

from __future__ import annotations

import functools
from typing import Any

import dill

import bigpool
from bigpool._function_cache import pickle_function


def _main_namespace(source: str, **globals_: Any) -> dict[str, Any]:
    """Run ``source`` as if in ``__main__`` (its functions pickle by value, as a script's do)."""
    namespace: dict[str, Any] = {"__name__": "__main__", **globals_}
    exec(compile(source, "<script>", "exec"), namespace)
    return namespace


def _run(data: bytes, *args: Any) -> Any:
    return dill.loads(data)(*args)


def test_by_value_pickle_is_reused_while_nothing_changes() -> None:
    ns = _main_namespace("def f():\n    return LIMIT\n", LIMIT=5)
    first = pickle_function(ns["f"])
    assert pickle_function(ns["f"]) is first
    assert _run(first) == 5


def test_rebinding_a_global_makes_a_new_pickle() -> None:
    ns = _main_namespace("def f():\n    return LIMIT\n", LIMIT=5)
    first = pickle_function(ns["f"])
    ns["LIMIT"] = 6
    second = pickle_function(ns["f"])
    assert second is not first
    assert _run(second) == 6


def test_redefining_a_helper_it_calls_makes_a_new_pickle() -> None:
    ns = _main_namespace(
        "def helper():\n    return SCALE * 2\n"
        "def f(x):\n    return helper() + x\n",
        SCALE=1,
    )
    assert _run(pickle_function(ns["f"]), 1) == 3
    exec("def helper():\n    return 100\n", ns)
    assert _run(pickle_function(ns["f"]), 1) == 101
    ns["SCALE"] = 10  # a global of the helper only
    exec("def helper():\n    return SCALE * 2\n", ns)
    assert _run(pickle_function(ns["f"]), 1) == 21


def test_a_global_named_only_by_a_nested_function_is_checked() -> None:
    ns = _main_namespace(
        "def f():\n    return (lambda: OFFSET)()\n", OFFSET=1)
    assert _run(pickle_function(ns["f"])) == 1
    ns["OFFSET"] = 2
    assert _run(pickle_function(ns["f"])) == 2


def test_closure_cells_and_defaults_are_checked() -> None:
    ns = _main_namespace(
        "def make():\n"
        "    n = 1\n"
        "    def f(x, k=10):\n        return x + n + k\n"
        "    def bump():\n        nonlocal n\n        n += 1\n"
        "    return f, bump\n"
    )
    f, bump = ns["make"]()
    assert _run(pickle_function(f), 0) == 11
    bump()
    assert _run(pickle_function(f), 0) == 12
    f.__defaults__ = (20,)
    assert _run(pickle_function(f), 0) == 22


def test_mutation_in_place_is_not_seen_once_sent() -> None:
    """As with multiprocessing's workers, which never see the parent's later mutations."""
    ns = _main_namespace("def f():\n    return CONFIG['k']\n", CONFIG={"k": 1})
    first = pickle_function(ns["f"])
    ns["CONFIG"]["k"] = 2
    assert pickle_function(ns["f"]) is first


def test_functions_by_reference_are_pickled_once() -> None:
    first = pickle_function(functools.reduce)
    assert _run(first, lambda a, b: a + b, [1, 2]) == 3
    assert pickle_function(_module_level) is pickle_function(_module_level)


def test_partials_are_pickled_afresh() -> None:
    args = [1]
    p = functools.partial(_module_level, args)
    assert _run(pickle_function(p)) == [1]
    args.append(2)
    assert _run(pickle_function(p)) == [1, 2]


def test_a_self_recursive_function_is_not_kept_alive_by_its_cache_entry() -> None:
    import gc
    import weakref

    ns = _main_namespace("def fact(n):\n    return 1 if n <= 1 else n * fact(n - 1)\n")
    assert _run(pickle_function(ns["fact"]), 5) == 120
    ref = weakref.ref(ns["fact"])
    ns.clear()
    gc.collect()
    assert ref() is None


def test_a_pool_sees_a_rebound_global() -> None:
    ns = _main_namespace("def f(x):\n    return x * FACTOR\n", FACTOR=2)
    with bigpool.BigPool(processes=1, system="test") as pool:
        assert pool.apply(ns["f"], (3,)) == 6
        assert pool.apply(ns["f"], (3,)) == 6
        ns["FACTOR"] = 5
        assert pool.apply(ns["f"], (3,)) == 15
        assert pool.map(ns["f"], [1, 2]) == [5, 10]


def _module_level(x: Any = None) -> Any:
    return x

