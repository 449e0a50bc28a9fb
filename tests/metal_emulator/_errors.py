"""Exceptions of the metal_emulator."""


class EmulatorError(RuntimeError):
    """A kernel failed under the emulator (out of bounds, race, deadlock, divergence, ...).

    Launches through MLX (lazy arrays) raise at eval time; MLX turns the C++ exception into a plain
    RuntimeError whose message starts with "[metal_emulator]". The sparse entry point raises this class.
    """


class EmulatorCompileError(EmulatorError):
    """The kernel source uses something outside the supported MSL subset, or does not compile."""


class EmulatorBuildError(EmulatorError):
    """The emulator's own extension or runtime could not be built (toolchain, nanobind ABI, ...)."""
