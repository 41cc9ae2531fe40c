"""The systems under test, by the name ``--system`` takes; each is imported only when used.

The registry says what each system supports without importing it, so the
matrix and the argument checks work without the optional peers installed.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

from .base import BenchmarkError, System

ENQUEUE_AND_DRAIN = frozenset({"enqueue-batch", "enqueue-single", "drain", "drain-history"})
WITH_LATENCY = ENQUEUE_AND_DRAIN | {"latency"}
EVERY_SCENARIO = WITH_LATENCY | {"stats"}


class Entry(NamedTuple):
    module: str
    class_name: str
    database: str  # "postgresql", "sqlite" or "mariadb"
    scenarios: frozenset[str]
    package: str | None = None  # the optional package (the "bench" extra) it needs


SYSTEMS = {
    "kronix-postgresql": Entry("kronix", "KronixPostgreSQL", "postgresql", EVERY_SCENARIO),
    "kronix-sqlite": Entry("kronix", "KronixSQLite", "sqlite", EVERY_SCENARIO),
    "kronix-mariadb": Entry("kronix", "KronixMariaDB", "mariadb", EVERY_SCENARIO),
    "pgqueuer": Entry("pgqueuer_peer", "PgQueuerSystem", "postgresql", WITH_LATENCY, "pgqueuer"),
    "procrastinate": Entry("procrastinate_peer", "ProcrastinateSystem", "postgresql", WITH_LATENCY, "procrastinate"),
    "raw-postgresql": Entry("raw_postgresql", "RawPostgreSQL", "postgresql", ENQUEUE_AND_DRAIN),
    "raw-sqlite": Entry("raw_sqlite", "RawSQLite", "sqlite", ENQUEUE_AND_DRAIN),
    "raw-mariadb": Entry("raw_mariadb", "RawMariaDB", "mariadb", ENQUEUE_AND_DRAIN),
}


def entry(name: str) -> Entry:
    if name not in SYSTEMS:
        raise BenchmarkError(f"unknown system {name!r}; choose one of: {', '.join(SYSTEMS)}")
    return SYSTEMS[name]


def load(name: str) -> type[System]:
    """The class of a system, or a BenchmarkError naming the missing package."""
    found = entry(name)
    try:
        module = importlib.import_module(f"{__name__}.{found.module}")
    except ImportError as error:
        if found.package:
            raise BenchmarkError(f"system {name!r} needs the {found.package!r} package: "
                                 f"pip install -e '.[bench]' ({error})") from error
        raise
    return getattr(module, found.class_name)
