import pytest

# Registers the `emulated_metal` fixture: the Metal-on-CPU emulator (tests/metal_emulator/README.md).
from metal_emulator.pytest_plugin import emulated_metal  # noqa: F401


CHUNKINGS = {
    # one pass over the whole arrays
    "whole arrays": {"KL_METAL_CPU_CHUNK": str(2**31 - 1)},
    # every row a chunk of its own over 3 streams: boundaries everywhere, more streams than cores
    "row chunks": {"KL_METAL_CPU_CHUNK": "1", "KL_METAL_CPU_STREAMS": "3"},
    # chunks of several rows (for D <= 50) over 2 streams, the last one usually partial
    "partial chunks": {"KL_METAL_CPU_CHUNK": "100", "KL_METAL_CPU_STREAMS": "2"},
}


@pytest.fixture(scope="module", params=list(CHUNKINGS))
def fallback_chunking(request):
    """Run a module's tests on each way the CPU fallback may cut its work (kl_metal/fallback.py)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CHUNKINGS[request.param].items():
            patch.setenv(name, value)
        yield request.param
