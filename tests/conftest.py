import pytest

# Registers the `emulated_metal` fixture: the Metal-on-CPU emulator (tests/metal_emulator/README.md).
from metal_emulator.pytest_plugin import emulated_metal  # noqa: F401


@pytest.fixture(scope="module", params=["whole arrays", "row chunks"])
def fallback_chunking(request):
    """Run a module's tests on both ways the CPU fallback cuts its work (kl_metal/fallback.py): one pass
    over the whole arrays, and every row a chunk of its own spread over 3 streams (chunk boundaries
    everywhere, more streams than this machine has cores, cross-stream dependencies)."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "row chunks":
            patch.setenv("KL_METAL_CPU_CHUNK", "1")
            patch.setenv("KL_METAL_CPU_STREAMS", "3")
        else:
            patch.setenv("KL_METAL_CPU_CHUNK", str(2**31 - 1))
        yield request.param
