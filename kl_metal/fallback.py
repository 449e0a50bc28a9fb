"""The reference path: the per-row KL primitive as composed MLX ops, on any device.

Implements the backend contract shared with `metal.py` (see `_autograd.py`): arrays arrive broadcast
and shaped (outer, D, inner), the reduction runs over axis 1 in float32, `g` is the per-row float32
cotangent with reduction scale and mask weights folded in.

Design for speed on the CPU, where `exp` dominates (about 1 s per 65M elements): each function is one
`mx.compile`d elementwise graph (fused into a single pass), and the forward keeps p = exp(t) in float32
for the backward, as MLX's own autograd of the reference keeps its `exp(targets)`: no pass recomputes
`exp`. Keeping p in float32 (not the targets' dtype) keeps gradients to one rounding; for half-precision
targets it costs twice the reference's saved bytes (see the benchmark notes in README.md).
"""
from __future__ import annotations

import functools

import mlx.core as mx

NAME = "fallback"


def _exclude(t: mx.array, g: mx.array) -> mx.array:
    """Where a gradient is exactly 0: a zero-probability target (t == -inf) or a zero cotangent row."""
    return (t == -mx.inf) | (g == 0)


@mx.compile
def _forward(x: mx.array, t: mx.array):
    tf, xf = t.astype(mx.float32), x.astype(mx.float32)
    p = mx.exp(tf)
    # t == -inf: the term is 0 (0 * log 0 = 0), whatever x is ...
    loss = mx.where(tf == -mx.inf, 0.0, p * (tf - xf)).sum(axis=1)
    # ... except that a NaN input stays NaN: checked per row, which writes no full-size temporary.
    return mx.where(mx.isnan(x.sum(axis=1)), mx.nan, loss), p


@mx.compile
def _weigh(loss: mx.array, w: mx.array) -> mx.array:
    return mx.where(w == 0, 0.0, w * loss)


def row_loss(x: mx.array, t: mx.array, w):
    """Per-row loss w * sum_d exp(t) * (t - x) in float32, shape (outer, inner); saved = (exp(t),)."""
    loss, p = _forward(x, t)
    if w is not None:
        loss = _weigh(loss, w)
    return loss, (p,)


@functools.lru_cache(maxsize=None)
def _grad_inputs(dtype: mx.Dtype):
    @mx.compile
    def grad(t, g, p):
        g = mx.expand_dims(g, 1)
        # p == 0 where t == -inf, and 0 - p * g is +0 there: the rule costs no comparison of t.
        return mx.where(g == 0, 0.0, 0.0 - p * g).astype(dtype)

    return grad


def grad_inputs(t: mx.array, g: mx.array, saved, dtype: mx.Dtype) -> mx.array:
    """d loss / d inputs = -exp(t) * g, exactly 0 where t == -inf or g == 0."""
    return _grad_inputs(dtype)(t, g, saved[0])


@mx.compile
def _grad_targets(x, t, g, p):
    g = mx.expand_dims(g, 1)
    tf = t.astype(mx.float32)
    value = p * (tf - x.astype(mx.float32) + 1.0) * g
    return mx.where(_exclude(t, g), 0.0, value).astype(t.dtype)


def grad_targets(x: mx.array, t: mx.array, g: mx.array, saved) -> mx.array:
    """d loss / d targets = exp(t) * (t - x + 1) * g, exactly 0 where t == -inf or g == 0."""
    return _grad_targets(x, t, g, saved[0])
