"""Metal-on-CPU emulator for `mx.fast.metal_kernel` (test infrastructure; see README.md).

Public API:
    metal_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False, *, bounds=True, race=False, traffic=True, coverage=True)
        -> MetalKernel, called like MLX's kernel object; returns lazy mx.arrays.
    emulated_metal(**modes)      context manager: kl_metal builds its kernels through the emulator.
    launches(), last_launch(name=None), clear_launches(), LaunchRecorder: traffic records.
    SparseBuffer, MetalKernel.run_sparse(...): direct launches of chosen threadgroups on huge buffers.
"""

from __future__ import annotations

import contextlib
import functools

from ._errors import EmulatorBuildError, EmulatorCompileError, EmulatorError
from ._kernel import (DEFAULT_MODES, BufferTraffic, LaunchRecord, LaunchRecorder, MetalKernel, SparseBuffer,
                      clear_launches, last_launch, launches, metal_kernel)

__all__ = [
    "metal_kernel", "MetalKernel", "emulated_metal", "EmulatedMetal", "launches", "last_launch", "clear_launches",
    "LaunchRecorder", "LaunchRecord", "BufferTraffic", "SparseBuffer", "EmulatorError", "EmulatorCompileError",
    "EmulatorBuildError", "DEFAULT_MODES", "generated_source",
]


def generated_source(kernel: MetalKernel, *, inputs, output_dtypes, template=None) -> str:
    """The exact Metal source MLX generates for `kernel` called with these inputs (arrays or scalars)."""
    from . import _kernel, _source

    arrays = [_kernel._to_array(x) for x in inputs]
    return kernel.generated_source([(a.dtype, _source.input_kind(a)) for a in arrays], list(output_dtypes), template)


class EmulatedMetal:
    """What `emulated_metal()` yields: the launches made under it and a way to change the modes."""

    def __init__(self, klm, modes: dict):
        self._klm = klm
        self.modes = dict(DEFAULT_MODES, **modes)
        self._recorder = LaunchRecorder()

    @property
    def launches(self) -> list[LaunchRecord]:
        """Launches evaluated while the emulator is installed (oldest first)."""
        return self._recorder.launches

    def last(self, name: str | None = None) -> LaunchRecord:
        return self._recorder.last(name)

    def of(self, name: str) -> list[LaunchRecord]:
        return self._recorder.of(name)

    def configure(self, **modes) -> None:
        """Switch checking modes for kernels kl_metal builds from now on (its kernel cache is reset)."""
        self.modes = dict(DEFAULT_MODES, **modes)
        self._klm.set_kernel_factory(functools.partial(metal_kernel, **self.modes))


@contextlib.contextmanager
def emulated_metal(**modes):
    """Install the emulator as kl_metal's kernel factory (kl_metal then targets "Metal"); restore on exit."""
    from kl_metal import metal as klm

    unknown = set(modes) - set(DEFAULT_MODES)
    if unknown:
        raise TypeError(f"emulated_metal() got unknown modes {sorted(unknown)}; known: {sorted(DEFAULT_MODES)}")
    prev = klm.set_kernel_factory(functools.partial(metal_kernel, **modes))
    em = EmulatedMetal(klm, modes)
    em._recorder.__enter__()
    try:
        yield em
    finally:
        em._recorder.__exit__(None, None, None)
        klm.set_kernel_factory(prev)
