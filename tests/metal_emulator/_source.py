"""Source fidelity: get the exact Metal source MLX generates for a `metal_kernel` call, from MLX.

On a machine without Metal, `mx.fast.metal_kernel(...)(..., verbose=True)` called while
`mx.export_function` traces a function prints the generated source ("Generated source code for
`name`:" and the text between ``` fences) to the C++ stdout, and the export completes. We capture
file descriptor 1 around such an export. The signature depends only on: the kernel definition,
input dtypes, whether each input is 0-d (`constant T&`) or has < 8 elements (`constant T*`),
output dtypes, the template arguments and `atomic_outputs`; the result is cached per such key.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading

import mlx.core as mx

from ._errors import EmulatorError

# The real factory, captured at import (kl_metal's seam may be redirected to the emulator).
_REAL_METAL_KERNEL = mx.fast.metal_kernel
_MAX_CONSTANT_ARRAY_SIZE = 8  # mlx/backend/common/metal_kernel.cpp: max_constant_array_size

_lock = threading.Lock()
_cache: dict[tuple, str] = {}


def input_kind(a: mx.array) -> str:
    """'s' (0-d, `constant T&`), 'c' (< 8 elements, `constant T*`) or 'd' (`device T*`)."""
    if a.ndim == 0:
        return "s"
    return "c" if a.size < _MAX_CONSTANT_ARRAY_SIZE else "d"


def template_key(template) -> tuple:
    out = []
    for name, value in template or ():
        if isinstance(value, mx.Dtype):
            out.append((name, "dtype", str(value)))
        elif isinstance(value, bool):
            out.append((name, "bool", bool(value)))
        elif isinstance(value, int):
            out.append((name, "int", int(value)))
        else:
            raise TypeError(f"[metal_kernel] Invalid template argument {name!r}: must be a dtype, int or bool, got "
                            f"{type(value).__name__}")
    return tuple(out)


def _example(dtype: mx.Dtype, kind: str) -> mx.array:
    if kind == "s":
        return mx.zeros((), dtype=dtype)
    return mx.zeros((1,) if kind == "c" else (_MAX_CONSTANT_ARRAY_SIZE,), dtype=dtype)


def generated_source(*, name: str, input_names, output_names, source: str, header: str, atomic_outputs: bool,
                     input_sig, output_dtypes, template) -> str:
    """MLX's generated source for the given signature. `input_sig`: [(dtype, kind)] per input."""
    key = (name, tuple(input_names), tuple(output_names), source, header, bool(atomic_outputs),
           tuple((str(d), k) for d, k in input_sig), tuple(str(d) for d in output_dtypes), template_key(template))
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            return hit
        text = _capture(name, list(input_names), list(output_names), source, header, atomic_outputs,
                        list(input_sig), list(output_dtypes), list(template or []))
        _cache[key] = text
        return text


def _capture(name, input_names, output_names, source, header, atomic_outputs, input_sig, output_dtypes,
             template) -> str:
    kernel = _REAL_METAL_KERNEL(name=name, input_names=input_names, output_names=output_names, source=source,
                                header=header, ensure_row_contiguous=True, atomic_outputs=atomic_outputs)
    examples = [_example(d, k) for d, k in input_sig]

    def fn(*args):
        kwargs = dict(inputs=list(args), grid=(1, 1, 1), threadgroup=(1, 1, 1),
                      output_shapes=[(1,)] * len(output_names), output_dtypes=list(output_dtypes), verbose=True)
        if template:
            kwargs["template"] = template
        return kernel(**kwargs)

    marker = f"Generated source code for `{name}`:\n```\n"
    with tempfile.TemporaryDirectory(prefix="metal_emulator_src_") as d, tempfile.TemporaryFile() as cap:
        sys.stdout.flush()
        saved = os.dup(1)
        error = None
        try:
            os.dup2(cap.fileno(), 1)
            try:
                mx.export_function(os.path.join(d, "kernel.mlxfn"), fn, *examples)
            except Exception as e:  # the source may have been printed before a later failure
                error = e
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        cap.seek(0)
        text = cap.read().decode("utf-8", errors="replace")
    start = text.find(marker)
    if start < 0:
        raise EmulatorError(f"[metal_emulator] MLX did not print the generated source of `{name}` "
                            f"(export_function error: {error!r}; captured output: {text[:500]!r})")
    start += len(marker)
    end = text.find("\n```\n", start)
    if end < 0:
        raise EmulatorError(f"[metal_emulator] truncated generated source of `{name}`")
    return text[start:end]
