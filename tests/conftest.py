# Registers the `emulated_metal` fixture: the Metal-on-CPU emulator (tests/metal_emulator/README.md).
from metal_emulator.pytest_plugin import emulated_metal  # noqa: F401
