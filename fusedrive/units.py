"""Human sizes for the command line: parse ``10GiB`` and print ``10 GiB``.

Input accepts a non-negative decimal number (``4096``, ``1.5``) followed by an
optional unit, case-insensitive, with optional spaces between:

- no unit or ``B``: bytes;
- ``K``/``KB``, ``M``/``MB``, ``G``/``GB``, ``T``/``TB``, ``P``/``PB``, ``E``/``EB``:
  decimal (powers of 1000, as disk vendors and ``df -H`` count);
- ``Ki``/``KiB``, ``Mi``/``MiB``, ... ``Ei``/``EiB``: binary (powers of 1024).

A number without a unit is a number of bytes and must be whole: ``1.5`` is
refused (it would be two bytes; ``1.5GiB`` was probably meant).

Invariants: parsing is exact (``decimal.Decimal``, never a float), a fraction of
a byte left by a unit (``0.1KiB``) is rounded up to the next whole byte so that a
requested capacity is never cut short, and ``parse_size(format_size(n)) == n``
whenever ``n`` is a whole number of its display unit. Output always uses binary units.
"""

from __future__ import annotations

import logging
import math
import re
from decimal import Decimal, InvalidOperation

log = logging.getLogger(__name__)

_DECIMAL_UNITS = ("k", "m", "g", "t", "p", "e")
_BINARY_NAMES = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")

_MULTIPLIERS: dict[str, int] = {"": 1, "b": 1}
for _i, _p in enumerate(_DECIMAL_UNITS, start=1):
    _MULTIPLIERS[_p] = _MULTIPLIERS[_p + "b"] = 1000**_i
    _MULTIPLIERS[_p + "i"] = _MULTIPLIERS[_p + "ib"] = 1024**_i

# Digits only: no sign, no exponent, no underscores, no "inf"/"nan".
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


class SizeError(ValueError):
    """A size string that is not a non-negative number with a known unit."""


def parse_size(text: str) -> int:
    """The number of bytes ``text`` names; raises ``SizeError`` with a readable reason."""
    if not isinstance(text, str):
        raise SizeError(f"size must be a string, not {type(text).__name__}")
    m = _SIZE.fullmatch(text)
    if m is None:
        if text.strip().startswith("-"):
            raise SizeError(f"invalid size {text!r}: a size cannot be negative")
        raise SizeError(
            f"invalid size {text!r}: expected a number with an optional unit, "
            "e.g. 4096, 512MiB, 10GiB, 1.5TiB or 1G (decimal)"
        )
    number, unit = m.groups()
    mult = _MULTIPLIERS.get(unit.lower())
    if mult is None:
        raise SizeError(
            f"invalid size {text!r}: unknown unit {unit!r} "
            "(use B, KiB, MiB, GiB, TiB, PiB, EiB or K, M, G, T, P, E for powers of 1000)"
        )
    if mult == 1 and "." in number and Decimal(number) != Decimal(number).to_integral_value():
        raise SizeError(
            f"invalid size {text!r}: a number of bytes must be whole (a size without a unit "
            f"is in bytes); add a unit, e.g. {number}GiB"
        )
    try:
        value = Decimal(number) * mult
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only digits
        raise SizeError(f"invalid size {text!r}") from exc
    return math.ceil(value)


def format_size(n: int) -> str:
    """``n`` bytes in the largest binary unit it reaches, to at most two decimals."""
    if n < 1024:
        return f"{n} B"
    exp = min(len(_BINARY_NAMES), int(math.log(n, 1024)))
    # math.log can land just below an exact power; correct it with integer arithmetic.
    while exp < len(_BINARY_NAMES) and n >= 1024 ** (exp + 1):
        exp += 1
    while exp > 1 and n < 1024**exp:
        exp -= 1
    unit = 1024**exp
    name = _BINARY_NAMES[exp - 1]
    if n % unit == 0:
        return f"{n // unit} {name}"
    text = f"{Decimal(n) / unit:.2f}".rstrip("0").rstrip(".")
    return f"{text} {name}"
