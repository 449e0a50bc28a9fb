"""The reference path: the per-row KL primitive as composed MLX ops, on any device.

Implements the backend contract shared with `metal.py` (see `_autograd.py`): arrays arrive broadcast
and shaped (outer, D, inner), the reduction runs over axis 1 in float32 (float64 for float64 arguments,
which only this path takes), `g` is the per-row cotangent with reduction scale and mask weights folded in.

Design (README, "The composed-op path"). `exp` dominates on the CPU (about 1 s per 65M elements on one
core), so the forward keeps p = exp(t) for the backward, as MLX's own autograd of the reference keeps its
`exp(targets)`: no pass recomputes `exp`. Under `mx.grad` and friends MLX does not compile (the arrays
are tracers) and every op is a full pass with a full-size temporary. So on the CPU each pass is cut into
chunks of whole rows (about `KL_METAL_CPU_CHUNK` elements: cache-sized temporaries; for a reduction
over a non-last axis the unit is a slice along the leading axes, D x inner elements), spread round-robin
over `KL_METAL_CPU_STREAMS` CPU streams, which MLX runs on threads of their own. Chunk k waits
(`_after`) for chunk k - streams, so only one chunk per stream is in flight and the temporaries stay a
few MB whatever order MLX evaluates the graph in (at most `MAX_CHUNKS` chunks). p is saved chunk by
chunk (one saved array per chunk) in the compute dtype (float32, or float64), or in bfloat16 when both
arguments are bfloat16 (`saved_dtype`): half the bytes, one more rounding in the gradients, none in
the loss. On a GPU device a pass is one chunk (the whole arrays)
and one compiled graph.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Callable, Optional

import mlx.core as mx

from . import config

CPU_CHUNK = config.register(
    config.integer(
        "KL_METAL_CPU_CHUNK",
        1 << 19,
        1,
        2**31 - 1,
        "fallback on the CPU: elements per chunk of whole rows (a row longer than this is a chunk of "
        "its own); the default keeps a float32 temporary at 2 MiB, cache-sized",
    )
)
MAX_CHUNKS = 256  # 1000 chunks cost 0.4 s of graph handling per step (MLX, quadratic in the count)
CPU_STREAMS = config.register(
    config.integer(
        "KL_METAL_CPU_STREAMS",
        None,
        1,
        64,
        "fallback on the CPU: number of streams (threads) the chunks are spread over "
        "(default: the CPU count, at most 8)",
    )
)


def compute_dtype(*dtypes: mx.Dtype) -> mx.Dtype:
    """float32 for every argument dtype but float64, which keeps its precision."""
    return mx.float64 if mx.float64 in dtypes else mx.float32


def saved_dtype(x_dtype: mx.Dtype, t_dtype: mx.Dtype) -> mx.Dtype:
    """The dtype p = exp(t) is kept in for the backward: bfloat16 when both gradients are bfloat16
    (float32's range, so no probability flushes to zero; the gradients get a second rounding of the
    same size as their own), else the compute dtype: a float32 or float64 gradient needs p's full
    precision, and float16's range would flush p < 6e-8 to zero."""
    both_bfloat16 = x_dtype == t_dtype == mx.bfloat16
    return mx.bfloat16 if both_bfloat16 else compute_dtype(x_dtype, t_dtype)


_THREAD = threading.local()  # MLX streams belong to the thread that made them: one pool per thread


def _streams() -> tuple:
    """The CPU streams chunks are dealt to, `KL_METAL_CPU_STREAMS` of them, made by this thread (MLX
    never frees a stream, so a changed setting reuses the ones made before)."""
    count = CPU_STREAMS.get() or min(8, os.cpu_count() or 1)
    pool = _THREAD.__dict__.setdefault("streams", [])
    while len(pool) < count:
        pool.append(mx.new_stream(mx.cpu))
    return tuple(pool[:count])


def _deal(sizes: list) -> list:
    """[(rows, stream)]: consecutive row slices of `sizes` rows each, dealt round-robin to this thread's
    CPU streams; a single chunk runs on the default stream (stream None)."""
    if len(sizes) == 1:
        return [(slice(0, sizes[0]), None)]
    streams, plan, start = _streams(), [], 0
    for k, size in enumerate(sizes):
        plan.append((slice(start, start + size), streams[k % len(streams)]))
        start += size
    return plan


def _stream_count(plan: list) -> int:
    return len({id(stream) for _, stream in plan})


def chunks(outer: int, row_elements: int) -> list:
    """How a pass over `outer` rows of `row_elements` elements each is cut: [(rows, stream)], `rows` a
    slice along axis 0 and `stream` None for the default stream (a single chunk: the whole arrays)."""
    # Each chunk adds a saved output to the custom function, and MLX handles those in quadratic time:
    # beyond MAX_CHUNKS chunks, chunks grow instead.
    rows = max(1, CPU_CHUNK.get() // max(1, row_elements), -(-outer // MAX_CHUNKS))
    CPU_STREAMS.get()  # read (and validated) on every call, like every KL_METAL_* variable
    if mx.default_device() != mx.cpu or rows >= outer:
        return _deal([outer])
    return _deal([min(rows, outer - start) for start in range(0, outer, rows)])


def _chunks_of(saved: tuple) -> list:
    """The chunks `row_loss` cut its rows into, read back from what it saved (one array per chunk), so
    that a backward pass cuts its rows the same way whatever the settings are by then."""
    return _deal([p.shape[0] for p in saved])


def describe(shape: tuple) -> str:
    """How the fallback cuts a problem of `shape` = (outer, D, inner), for `kl_metal.explain`."""
    outer, length, inner = shape
    plan = chunks(outer, length * inner)
    if len(plan) == 1:
        return "one pass over the whole arrays per operation"
    rows = plan[0][0].stop
    unit = "rows" if inner == 1 else f"slices of {length}x{inner} elements"
    streams = _stream_count(plan)
    setting = CPU_STREAMS.get() or f"{len(_streams())} (default)"
    return (f"{len(plan)} chunks of {rows} {unit} over {streams} CPU streams "
            f"({CPU_CHUNK.name}={CPU_CHUNK.get()}, {CPU_STREAMS.name}={setting})")


@mx.custom_function
def _after(parts: list, done: list) -> list:
    """`parts` unchanged (no copy), but evaluated only after `done`: `mx.depends` with the rules of
    an identity, as `mx.vmap` has none for `mx.depends` (and transforms the forward graph too)."""
    return list(parts)


@_after.vjp
def _after_vjp(primals, cotangents, outputs):
    return list(cotangents), [mx.zeros_like(d) for d in primals[1]]


@_after.jvp
def _after_jvp(primals, tangents):
    # A tangent that came only through `done` leaves None for the parts; MLX 0.32 crashes on a jvp rule
    # returning only None.
    return [mx.zeros_like(p) if d is None else d for p, d in zip(primals[0], tangents[0])]


@_after.vmap
def _after_vmap(inputs, axes):
    return list(inputs[0]), list(axes[0])


@mx.custom_function
def _exp_of(p: mx.array, t: mx.array) -> mx.array:
    """p, the saved exp(t), carrying its derivative in t again: the saved arrays leave the forward as
    plain outputs, so without this a derivative of the backward (second order) would miss d p / d t."""
    return p


@_exp_of.vjp
def _exp_of_vjp(primals, cotangent, output):
    p, t = primals
    return mx.zeros_like(p), (cotangent * p).astype(t.dtype)


@_exp_of.jvp
def _exp_of_jvp(primals, tangents):
    p, t = primals
    return mx.zeros_like(p) if tangents[1] is None else (p * tangents[1]).astype(p.dtype)


@_exp_of.vmap
def _exp_of_vmap(inputs, axes):
    p, t = inputs
    return p, axes[0]


def _run(plan: list, fn: Callable, arrays: list, saved: Optional[tuple] = None) -> list:
    """[fn(*row slices of `arrays`[, saved part]) for each chunk of `plan`], each on its chunk's stream.

    Chunk k's inputs wait for chunk k - streams's results, so that one chunk per stream is in flight.
    A single chunk is fn on the whole arrays, on the default stream."""
    extra = lambda k: [] if saved is None else [saved[k]]  # noqa: E731
    if len(plan) == 1:
        return [fn(*arrays, *extra(0))]
    lag = _stream_count(plan)
    results = []
    for k, (rows, stream) in enumerate(plan):
        parts = [a[rows] for a in arrays]
        if k >= lag:
            done = results[k - lag]
            parts = _after(parts, list(done) if isinstance(done, tuple) else [done])
        with mx.stream(stream):
            results.append(fn(*parts, *extra(k)))
    return results


def _join(parts: list) -> mx.array:
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


def _exclude(t: mx.array, g: mx.array) -> mx.array:
    """Where a gradient is exactly 0: a zero-probability target (t == -inf) or a zero cotangent row."""
    # mx.logical_or, not `|`: under mx.vmap MLX 0.32 drops the batch axis of `a | b` when only b has one.
    return mx.logical_or(t == -mx.inf, g == 0)


@functools.lru_cache(maxsize=None)
def _forward(dtype: mx.Dtype, saved: mx.Dtype):
    @mx.compile
    def forward(x: mx.array, t: mx.array):
        tf, xf = t.astype(dtype), x.astype(dtype)
        p = mx.exp(tf)
        # t == -inf: the term is 0 (0 * log 0 = 0), whatever x is, except that a NaN input stays NaN.
        zero_probability = mx.where(mx.isnan(xf), xf, 0.0)
        term = mx.where(tf == -mx.inf, zero_probability, p * (tf - xf))
        return term.sum(axis=1), p

    def forward_saving(x: mx.array, t: mx.array):
        # The cast stays outside the compiled graph: inside it, MLX 0.32 stops fusing and materializes
        # every float32 intermediate (measured: 7x the bytes of a bfloat16 argument instead of 5x).
        loss, p = forward(x, t)
        return loss, p.astype(saved)

    return forward if saved == dtype else forward_saving


@mx.compile
def _weigh(loss: mx.array, w: mx.array) -> mx.array:
    return mx.where(w == 0, 0.0, w * loss)


def row_loss(x: mx.array, t: mx.array, w):
    """Per-row loss w * sum_d exp(t) * (t - x), shape (outer, inner); saved = exp(t), one per chunk."""
    forward = _forward(compute_dtype(x.dtype, t.dtype), saved_dtype(x.dtype, t.dtype))
    results = _run(chunks(x.shape[0], x.shape[1] * x.shape[2]), forward, [x, t])
    loss = _join([loss for loss, _ in results])
    if w is not None:
        loss = _weigh(loss, w)
    return loss, tuple(p for _, p in results)


@functools.lru_cache(maxsize=None)
def _grad_inputs(dtype: mx.Dtype):
    @mx.compile
    def grad(t, g, p):
        p = _exp_of(p, t)
        g = mx.expand_dims(g, 1)
        return mx.where(_exclude(t, g), 0.0, -(p * g)).astype(dtype)

    return grad


def grad_inputs(t: mx.array, g: mx.array, saved, dtype: mx.Dtype) -> mx.array:
    """d loss / d inputs = -exp(t) * g, exactly 0 where t == -inf or g == 0."""
    return _join(_run(_chunks_of(saved), _grad_inputs(dtype), [t, g], saved))


@mx.compile
def _grad_targets(x, t, g, p):
    p = _exp_of(p, t)
    g = mx.expand_dims(g, 1)
    dtype = compute_dtype(x.dtype, t.dtype)
    tf = t.astype(dtype)
    value = p.astype(dtype) * (tf - x.astype(dtype) + 1.0) * g
    return mx.where(_exclude(t, g), 0.0, value).astype(t.dtype)


def grad_targets(x: mx.array, t: mx.array, g: mx.array, saved) -> mx.array:
    """d loss / d targets = exp(t) * (t - x + 1) * g, exactly 0 where t == -inf or g == 0."""
    return _join(_run(_chunks_of(saved), _grad_targets, [x, t, g], saved))


def regroup_saved(saved: tuple, batch: int, shape: tuple) -> tuple:
    """`saved` of a call on (batch * outer, D, inner) arrays, cut as a call on (outer, D, inner) arrays
    cuts it, each part with a leading batch axis: what `mx.vmap` of the forward must produce."""
    outer, length, inner = shape
    p = _join(list(saved)).reshape(batch, outer, length, inner)
    return tuple(p[:, rows] for rows, _ in chunks(outer, length * inner))
