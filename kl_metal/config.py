"""`KL_METAL_*` environment variables: parsed and validated at call time, one place for all of them.

Each variable is declared once (`EnvVar`) with its default, valid range and effect; `README.md` documents
the same table. Reading is done on every call, so a change of the environment takes effect at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence


@dataclass(frozen=True)
class EnvVar:
    """One `KL_METAL_*` variable: name, default, what it accepts, what it changes."""

    name: str
    default: object
    allowed: str  # human-readable valid values, used in error messages and docs
    effect: str
    parse: Callable[[str], object]

    def get(self) -> object:
        """The value in effect now: the parsed environment value, or the default when unset or empty."""
        raw = os.environ.get(self.name, "").strip()
        if raw == "":
            return self.default
        try:
            return self.parse(raw)
        except ValueError:
            raise ValueError(
                f"{self.name}={os.environ[self.name]!r} is invalid: allowed values are {self.allowed}"
            ) from None


def choice(name: str, default: str, choices: Sequence[str], effect: str) -> EnvVar:
    """A variable taking one of `choices` (case-insensitive)."""

    def parse(raw: str) -> str:
        value = raw.lower()
        if value not in choices:
            raise ValueError(raw)
        return value

    return EnvVar(name, default, " | ".join(choices), effect, parse)


def integer(
    name: str,
    default: Optional[int],
    low: int,
    high: int,
    effect: str,
    *,
    multiple_of: int = 1,
    power_of_two: bool = False,
) -> EnvVar:
    """An integer variable in [low, high], optionally a multiple of `multiple_of` or a power of two.

    `default` may be None, meaning "chosen automatically" by the code that reads it.
    """
    rules = f"integers in [{low}, {high}]"
    if multiple_of > 1:
        rules += f", multiples of {multiple_of}"
    if power_of_two:
        rules += ", powers of two"

    def parse(raw: str) -> int:
        value = int(raw, 10)  # ValueError on anything that is not a plain decimal integer
        if not low <= value <= high or value % multiple_of:
            raise ValueError(raw)
        if power_of_two and value & (value - 1):
            raise ValueError(raw)
        return value

    return EnvVar(name, default, rules, effect, parse)


BACKEND = choice(
    "KL_METAL_BACKEND",
    "auto",
    ("auto", "fused", "fallback"),
    "auto: fused kernels where Metal is the target device, else composed MLX ops; "
    "fused: always the fused kernels (error where they can't run); fallback: always composed MLX ops",
)

# Launch-grid variables of the fused kernels are declared next to the code that uses them
# (kl_metal/metal.py) with the helpers above, and listed here so docs and validation see them all.
ALL: list[EnvVar] = [BACKEND]


def register(var: EnvVar) -> EnvVar:
    """Add a variable to `ALL` (for `python -m kl_metal`, docs and tests) and return it."""
    ALL.append(var)
    return var
