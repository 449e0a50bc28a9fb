"""Helpers for the emulator's own tests."""

import mlx.core as mx
import numpy as np

import metal_emulator as me

SIZES = [1, 31, 33, 96, 100, 1024]


def grid_for(tg: int) -> int:
    """A 1-D grid with two full threadgroups and a partial edge one."""
    return 2 * tg + (tg + 1) // 2


def lanes(n: int, tg: int):
    """Per thread of a 1-D dispatch of n threads in groups of tg: (group size, simdgroup, lane, active lanes)."""
    gid = np.arange(n)
    g = gid // tg
    ti = gid % tg
    gs = np.minimum(tg, n - g * tg)
    sg = ti // 32
    lane = ti % 32
    count = np.minimum(32, gs - sg * 32)
    base = g * tg + sg * 32
    return gs, sg, lane, count, base


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (round to nearest even) -> float32."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def run1(kernel, inputs, n, tg, out_dtypes=(mx.float32,), out_shapes=None, **kw):
    outs = kernel(inputs=inputs, grid=(n, 1, 1), threadgroup=(tg, 1, 1),
                  output_shapes=out_shapes or [(n,)] * len(out_dtypes), output_dtypes=list(out_dtypes), **kw)
    mx.eval(*outs)
    return [np.array(o) for o in outs]


__all__ = ["me", "SIZES", "grid_for", "lanes", "bf16_round", "run1"]
