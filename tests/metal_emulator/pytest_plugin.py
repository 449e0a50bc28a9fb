"""The `emulated_metal` pytest fixture (registered by tests/conftest.py)."""

import pytest

from . import emulated_metal as _emulated_metal


@pytest.fixture
def emulated_metal():
    """kl_metal runs its fused Metal path on the CPU emulator for the duration of the test.

    Yields an EmulatedMetal: `.launches` / `.last(name)` give the traffic records of the launches
    evaluated during the test; `.configure(race=True, ...)` changes the checking modes.
    """
    with _emulated_metal() as em:
        yield em
