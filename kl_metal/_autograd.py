"""The per-row KL primitive with explicit autograd rules, one `mx.custom_function` per backend.

A backend (`fallback`, `metal`) implements four functions on arrays shaped (outer, D, inner), reducing
over axis 1 (D) in float32 (float64 for float64 arguments, which only the fallback takes):

    row_loss(x, t, w)              -> (loss, saved)   loss[o, i] = w[o, i] * sum_d term(x, t)  (float32)
    regroup_saved(saved, b, shape) -> saved of a call on (b * outer, D, inner), laid out as a call on
                                      `shape` = (outer, D, inner) lays it out, with a leading axis b
    grad_inputs(t, g, saved, dt)   -> d loss / d x = -exp(t) * g                 (dtype dt)
    grad_targets(x, t, g, saved)   -> d loss / d t =  exp(t) * (t - x + 1) * g   (dtype of t)

with term = exp(t) * (t - x), the zero-probability rule (t == -inf: term and gradients are 0) and
g the per-row float32 cotangent with the row weights already folded in (rows with g == 0 get exactly
zero gradient). `saved` holds what the backend's backward wants from its forward (the fallback keeps
exp(t); the kernels keep nothing). Everything here is backend-agnostic: the rules only call these.

dx and dt are separate lazy graph nodes, so a gradient nobody asks for is never evaluated.
"""
from __future__ import annotations

import functools

import mlx.core as mx


def _weights(g: mx.array, w) -> mx.array:
    g = g.astype(mx.result_type(g.dtype, mx.float32))  # float32, or float64 on a float64 loss
    return g if w is None else g * w


@functools.lru_cache(maxsize=None)
def primitive(backend):
    """The custom function `kl_rows(x, t, w) -> (loss, *saved)` running on `backend` (a module)."""

    @mx.custom_function
    def kl_rows(x, t, w):
        # mx.jvp transforms every operation downstream of the primals, even inside a custom function
        # whose jvp rule replaces them, and a kernel launch has no jvp of its own: detach the forward's
        # operands so that only the rules below are ever transformed.
        loss, saved = backend.row_loss(mx.stop_gradient(x), mx.stop_gradient(t), w)
        return (loss, *saved)

    @kl_rows.vjp
    def kl_rows_vjp(primals, cotangents, outputs):
        x, t, w = primals
        g = _weights(cotangents[0], w)
        saved = tuple(outputs[1:])
        dx = backend.grad_inputs(t, g, saved, x.dtype)
        dt = backend.grad_targets(x, t, g, saved)
        # One gradient per array input (a missing one would make MLX hand back the cotangent itself).
        return (dx, dt) if w is None else (dx, dt, mx.zeros_like(w))

    @kl_rows.jvp
    def kl_rows_jvp(primals, tangents):
        x, t, w = primals
        tx, tt = tangents[0], tangents[1]
        loss, saved = backend.row_loss(x, t, w)
        dtype = loss.dtype
        weights = mx.ones(loss.shape, dtype) if w is None else w
        tangent = mx.zeros(loss.shape, dtype)
        if tx is not None:
            dx = backend.grad_inputs(t, weights, saved, dtype)
            tangent = tangent + (dx * tx.astype(dtype)).sum(axis=1)
        if tt is not None:
            dt = backend.grad_targets(x, t, weights, saved).astype(dtype)
            tangent = tangent + (dt * tt.astype(dtype)).sum(axis=1)
        # The saved arrays are internal (never returned to users): their tangents are never read.
        return [tangent, *(mx.zeros_like(s) for s in saved)]

    @kl_rows.vmap
    def kl_rows_vmap(inputs, axes):
        x, t, w = inputs
        batch = next(a.shape[ax] for a, ax in zip(inputs, axes) if a is not None and ax is not None)

        def batch_first(a, ax):
            if a is None:
                return None
            if ax is None:
                return mx.broadcast_to(a, (batch, *a.shape))
            return mx.moveaxis(a, ax, 0)

        x, t, w = (batch_first(a, ax) for a, ax in zip(inputs, axes))
        outer = x.shape[1]
        merge = lambda a: None if a is None else a.reshape(batch * outer, *a.shape[2:])  # noqa: E731
        loss, *saved = kl_rows(merge(x), merge(t), merge(w))
        loss = loss.reshape(batch, outer, *loss.shape[1:])
        # The saved outputs must match the unbatched call's, which the backend may cut in parts.
        saved = backend.regroup_saved(tuple(saved), batch, x.shape[1:])
        return [loss, *saved], [0] * (1 + len(saved))

    return kl_rows


def kl_rows(backend, x: mx.array, t: mx.array, w) -> mx.array:
    """Per-row weighted KL, float32 (float64 for float64 arguments), shape (outer, inner), differentiable
    in x and t."""
    return primitive(backend)(x, t, w)[0]
