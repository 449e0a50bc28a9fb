"""The reference path: the per-row KL primitive as composed MLX ops, on any device.

Implements the backend contract shared with `metal.py` (see `_autograd.py`): arrays arrive broadcast
and shaped (outer, D, inner), the reduction runs over axis 1 in float32 (float64 for float64 arguments,
which only this path takes), `g` is the per-row cotangent with reduction scale and mask weights folded in.

Design for speed on the CPU, where `exp` dominates (about 1 s per 65M elements): each function is one
`mx.compile`d elementwise graph (fused into a single pass), and the forward keeps p = exp(t) in float32
for the backward, as MLX's own autograd of the reference keeps its `exp(targets)`: no pass recomputes
`exp`. Keeping p in float32 (not the targets' dtype) keeps gradients to one rounding; for half-precision
targets it costs twice the reference's saved bytes. Under `mx.grad` and friends MLX does not compile
(the arrays are tracers): these graphs then run op by op, which is why the gradient passes are slower
than the reference's on the CPU (README, "Benchmarks").
"""
from __future__ import annotations

import functools

import mlx.core as mx


def compute_dtype(*dtypes: mx.Dtype) -> mx.Dtype:
    """float32 for every argument dtype but float64, which keeps its precision."""
    return mx.float64 if mx.float64 in dtypes else mx.float32


def _exclude(t: mx.array, g: mx.array) -> mx.array:
    """Where a gradient is exactly 0: a zero-probability target (t == -inf) or a zero cotangent row."""
    return (t == -mx.inf) | (g == 0)


@functools.lru_cache(maxsize=None)
def _forward(dtype: mx.Dtype):
    @mx.compile
    def forward(x: mx.array, t: mx.array):
        tf, xf = t.astype(dtype), x.astype(dtype)
        p = mx.exp(tf)
        # t == -inf: the term is 0 (0 * log 0 = 0), whatever x is, except that a NaN input stays NaN.
        zero_probability = mx.where(mx.isnan(xf), xf, 0.0)
        term = mx.where(tf == -mx.inf, zero_probability, p * (tf - xf))
        return term.sum(axis=1), p

    return forward


@mx.compile
def _weigh(loss: mx.array, w: mx.array) -> mx.array:
    return mx.where(w == 0, 0.0, w * loss)


def row_loss(x: mx.array, t: mx.array, w):
    """Per-row loss w * sum_d exp(t) * (t - x), shape (outer, inner); saved = (exp(t),)."""
    loss, p = _forward(compute_dtype(x.dtype, t.dtype))(x, t)
    if w is not None:
        loss = _weigh(loss, w)
    return loss, (p,)


@functools.lru_cache(maxsize=None)
def _grad_inputs(dtype: mx.Dtype):
    @mx.compile
    def grad(t, g, p):
        g = mx.expand_dims(g, 1)
        return mx.where(_exclude(t, g), 0.0, -(p * g)).astype(dtype)

    return grad


def grad_inputs(t: mx.array, g: mx.array, saved, dtype: mx.Dtype) -> mx.array:
    """d loss / d inputs = -exp(t) * g, exactly 0 where t == -inf or g == 0."""
    return _grad_inputs(dtype)(t, g, saved[0])


@mx.compile
def _grad_targets(x, t, g, p):
    g = mx.expand_dims(g, 1)
    tf = t.astype(p.dtype)
    value = p * (tf - x.astype(p.dtype) + 1.0) * g
    return mx.where(_exclude(t, g), 0.0, value).astype(t.dtype)


def grad_targets(x: mx.array, t: mx.array, g: mx.array, saved) -> mx.array:
    """d loss / d targets = exp(t) * (t - x + 1) * g, exactly 0 where t == -inf or g == 0."""
    return _grad_targets(x, t, g, saved[0])
