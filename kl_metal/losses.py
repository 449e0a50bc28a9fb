"""Public loss functions: argument checks, broadcasting, masks and reductions around the per-row primitive."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import mlx.core as mx

from . import _autograd, dispatch

REDUCTIONS = ("none", "mean", "sum")


class _Problem(NamedTuple):
    x: mx.array  # inputs, broadcast and shaped (outer, D, inner)
    t: mx.array  # targets, likewise
    w: Optional[mx.array]  # float32 row weights (outer, inner), or None
    row_shape: tuple  # shape of the per-row loss
    out_dtype: mx.Dtype


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def _check_array(name: str, value) -> mx.array:
    if not isinstance(value, mx.array):
        raise TypeError(f"{name} must be an mlx.core.array, got {type(value).__name__}")
    if not mx.issubdtype(value.dtype, mx.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float32, float16, bfloat16, float64), "
            f"got {_dtype_name(value.dtype)}"
        )
    return value


def _broadcast_shape_and_axis(names: tuple, a: mx.array, b: mx.array, axis, reduction) -> tuple:
    """Check `reduction` and `axis` against the broadcast shape of `a` and `b` (named `names` in
    errors); return that shape and the axis made non-negative."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {', '.join(map(repr, REDUCTIONS))}")
    try:
        shape = tuple(mx.broadcast_shapes(a.shape, b.shape))
    except ValueError:
        raise ValueError(
            f"{names[0]} shape {tuple(a.shape)} and {names[1]} shape {tuple(b.shape)} do not broadcast"
        ) from None
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis={axis} is out of range for the broadcast shape {shape} (ndim {len(shape)})")
    return shape, axis % len(shape)


def _prepare(inputs, targets, axis, reduction, mask) -> _Problem:
    inputs = _check_array("inputs", inputs)
    targets = _check_array("targets", targets)
    shape, axis = _broadcast_shape_and_axis(("inputs", "targets"), inputs, targets, axis, reduction)
    outer, length, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
    row_shape = shape[:axis] + shape[axis + 1 :]

    x = mx.broadcast_to(inputs, shape).reshape(outer, length, inner)
    t = mx.broadcast_to(targets, shape).reshape(outer, length, inner)
    w = None if mask is None else _row_weights(mask, row_shape).reshape(outer, inner)
    return _Problem(x, t, w, row_shape, mx.result_type(inputs.dtype, targets.dtype))


def _row_weights(mask, row_shape: tuple) -> mx.array:
    if not isinstance(mask, mx.array):
        raise TypeError(f"mask must be an mlx.core.array, got {type(mask).__name__}")
    if mask.dtype != mx.bool_ and not mx.issubdtype(mask.dtype, mx.floating):
        raise TypeError(f"mask must be bool or floating (per-row weights), got {_dtype_name(mask.dtype)}")
    try:
        fits = tuple(mx.broadcast_shapes(mask.shape, row_shape)) == row_shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not broadcast to the per-row loss shape {row_shape}"
        )
    return mx.stop_gradient(mx.broadcast_to(mask.astype(mx.float32), row_shape))


def _reduce(loss: mx.array, w: Optional[mx.array], reduction: str) -> mx.array:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if w is None:
        return loss.mean()
    total = w.sum()
    return loss.sum() / mx.where(total == 0, 1.0, total)  # all weights 0: the loss is 0, not NaN


def kl_div_loss(
    inputs: mx.array,
    targets: mx.array,
    axis: int = -1,
    reduction: str = "none",
    *,
    mask: Optional[mx.array] = None,
) -> mx.array:
    r"""Kullback-Leibler divergence KL(targets || inputs) from log-probabilities.

    A drop-in for ``mlx.nn.losses.kl_div_loss`` (same arguments, broadcasting, output shape and dtype),
    computed by fused Metal kernels where Metal is the target device and by composed MLX ops elsewhere
    (``kl_metal.explain`` says which and why).

    .. math::

        \ell = \sum_{\text{axis}} e^{t} \, (t - x), \quad x = \text{inputs}, \; t = \text{targets}

    Args:
        inputs (array): Log-probabilities of the predicted distribution (the student).
        targets (array): Log-probabilities of the target distribution (the teacher).
        axis (int, optional): The distribution axis of the broadcast shape. Default: ``-1``.
        reduction (str, optional): ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'none'``.
        mask (array, optional): Keyword only. Bool or floating per-row weights ``w``, broadcastable to
            the per-row loss shape (the broadcast shape without ``axis``). ``'none'`` returns ``w * loss``,
            ``'sum'`` returns ``sum(w * loss)``, ``'mean'`` returns ``sum(w * loss) / sum(w)``, and 0 when
            every weight is 0. Rows of weight 0 give 0 loss and 0 gradient (their values are not even
            read by the fused kernels). No gradient flows into ``mask``.

    Returns:
        array: The per-row loss (``'none'``) or its mean or sum, in the dtype the MLX reference returns
        for the same ``inputs`` and ``targets`` (e.g. bfloat16 for bfloat16 arguments).

    Conventions, and differences from ``mlx.nn.losses.kl_div_loss``:

    * Every sum accumulates in float32 (the reference sums half types in their own dtype), and the
      result is rounded once to the output dtype.
    * Zero probability: where ``targets == -inf`` the term and both its gradients are exactly 0
      (0 log 0 = 0; the reference gives NaN). A NaN in ``inputs`` at such a place still gives NaN.
    * ``inputs == -inf`` with finite targets gives ``+inf`` (the true KL).
    * NaN in either argument gives NaN in that row's loss, never a silent 0.
    * A zero per-row cotangent (e.g. a masked row) gives exactly zero gradients for the row.
    * ``'mean'`` over zero rows is NaN, like the reference; an axis of length 0 gives zeros.
    * Gradients: d/dinputs = -exp(t) * g, d/dtargets = exp(t) * (t - x + 1) * g, with g the per-row
      cotangent, in float32 and rounded once to the argument's dtype (twice on the composed-op path
      when both arguments are bfloat16: it keeps exp(t) in bfloat16 for the backward, to hold no more
      memory than the reference); each is computed only when asked for (a teacher under
      ``mx.stop_gradient`` costs nothing). ``mx.grad``, ``mx.vjp``, ``mx.jvp`` and ``mx.compile`` (not shapeless) work on both paths;
      ``mx.vmap`` works on the composed-op path only: MLX 0.32 vmaps every operation inside a custom
      function, and a Metal kernel launch has no vmap (set ``KL_METAL_BACKEND=fallback`` under vmap).
    * Integer, bool and complex arguments are rejected (TypeError), not converted.

    Example:
        >>> import mlx.core as mx, kl_metal
        >>> p = mx.log(mx.array([[0.5, 0.5], [0.8, 0.2]]))
        >>> q = mx.log(mx.array([[0.5, 0.5], [0.2, 0.8]]))
        >>> kl_metal.kl_div_loss(p, q)  # array([0, 0.831777], dtype=float32)
    """
    problem = _prepare(inputs, targets, axis, reduction, mask)
    decision = dispatch.decide(problem.x.shape, problem.x.dtype, problem.t.dtype, problem.w is not None)
    loss = _autograd.kl_rows(decision.backend, problem.x, problem.t, problem.w)
    loss = _reduce(loss.reshape(problem.row_shape), problem.w, reduction)
    return loss.astype(problem.out_dtype)


def explain(
    inputs: mx.array,
    targets: mx.array,
    axis: int = -1,
    reduction: str = "none",
    *,
    mask: Optional[mx.array] = None,
) -> dispatch.Decision:
    """What `kl_div_loss` would do with these arguments: path, why, and the kernel plan if fused.

    Validates the arguments exactly as `kl_div_loss` does and launches nothing. ``print()`` the result
    for a readable report.
    """
    problem = _prepare(inputs, targets, axis, reduction, mask)
    return dispatch.decide(problem.x.shape, problem.x.dtype, problem.t.dtype, problem.w is not None)
