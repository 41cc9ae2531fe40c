"""Amounts of things a job needs and a worker has: ``gpu=1``, ``mem=64G``, ``memory_limit="2GiB"``.

A resource is a lower-case name (``gpu``, ``mem``, ``licence_sas``) and a
finite amount >= 0; a size in bytes may be written with a unit (``64G``,
``512MiB``, ``1.5GB``: K/M/G/T are powers of 1024 with or without ``i``, KB/MB/GB/TB
powers of 1000).  Requirements are stored on the job's row as canonical JSON
(sorted keys, numbers), the same text whoever wrote them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import InvalidInputError

#: A resource name: it becomes a JSON path in the claim statement, so it is kept to these characters.
RESOURCE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgtp]?)(i?)(b?)\s*", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(value: Any, what: str = "size") -> float:
    """Bytes in ``value``: a number, or text like ``"2GiB"``, ``"64G"``, ``"500MB"``."""
    if isinstance(value, bool):
        raise InvalidInputError(f"{what} must be a number of bytes or a size like '2GiB', got {value!r}")
    if isinstance(value, (int, float)):
        amount = float(value)
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        number, power, binary, byte = match.groups()
        decimal = bool(byte) and not binary and power != ""
        amount = float(number) * (1000 if decimal else 1024) ** _POWERS[power.lower()]
    else:
        raise InvalidInputError(f"{what} must be a number of bytes or a size like '2GiB', got {value!r}")
    if not math.isfinite(amount) or amount < 0:
        raise InvalidInputError(f"{what} must be a finite size >= 0, got {value!r}")
    return amount


def format_size(amount: float) -> str:
    """``2147483648`` -> ``"2 GiB"``: for messages."""
    for unit, power in (("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if amount >= 1024 ** power:
            return f"{amount / 1024 ** power:.3g} {unit}"
    return f"{amount:.0f} B"


def checked_resources(value: Mapping[str, Any] | None, what: str) -> dict[str, float] | None:
    """``{"gpu": 1, "mem": "64G"}`` as ``{"gpu": 1.0, "mem": 68719476736.0}``; None or empty: None."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"{what} must be a dict of resource names to amounts, got {type(value).__name__}")
    amounts = {}
    for name, amount in value.items():
        if not isinstance(name, str) or not RESOURCE_NAME.fullmatch(name):
            raise InvalidInputError(f"{what}: resource name {name!r} must be lower-case letters, digits and _ "
                                    "(starting with a letter, at most 32)")
        amounts[name] = parse_size(amount, f"{what}[{name!r}]")
    return dict(sorted(amounts.items())) or None


def parse_resources(text: str) -> dict[str, float]:
    """``"gpu=1,mem=64G"`` (the ``--resources`` option) as a dict of amounts."""
    pairs = {}
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        name, equals, amount = part.partition("=")
        if not equals:
            raise InvalidInputError(f"resources: {part!r} is not NAME=AMOUNT (like gpu=1,mem=64G)")
        pairs[name.strip()] = amount.strip()
    return checked_resources(pairs, "resources") or {}


def resources_text(resources: Mapping[str, float] | None) -> str:
    """``{"gpu": 1.0, "mem": 68719476736.0}`` as ``gpu=1,mem=64G`` (``-`` for none): for tables."""
    if not resources:
        return "-"
    return ",".join(f"{name}={_short(amount)}" for name, amount in sorted(resources.items()))


def _short(amount: float) -> str:
    for unit, power in (("T", 4), ("G", 3), ("M", 2)):
        if amount >= 1024 ** power and amount % 1024 ** power == 0:
            return f"{amount / 1024 ** power:g}{unit}"
    return f"{amount:g}"


def encode_requirements(requires: Mapping[str, float] | None) -> str | None:
    """The stored text of a job's requirements (NULL for none)."""
    return json.dumps(dict(sorted(requires.items())), separators=(",", ":")) if requires else None


def covers(resources: Mapping[str, float], requires: Mapping[str, float] | None) -> bool:
    """Whether ``resources`` hold every amount ``requires`` asks for."""
    return all(resources.get(name, 0.0) >= amount for name, amount in (requires or {}).items())


def in_use(requirements: Iterable[Mapping[str, float] | None]) -> dict[str, float]:
    """The amounts taken by jobs with these requirements, summed."""
    used: dict[str, float] = {}
    for requires in requirements:
        for name, amount in (requires or {}).items():
            used[name] = used.get(name, 0.0) + amount
    return used
