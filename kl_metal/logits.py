"""Distillation from logits: `kl_div_from_logits`, its autograd rules, the composed-op path and the kernels' host side.

`kl_div_from_logits(student_logits, teacher_logits)` is KL(softmax(teacher / T) || softmax(student / T))
per row, without materialising either log-softmax. The per-row primitive works on (rows, D) arrays
(the distribution axis last) and has two backends with one contract:

    forward(s, t, w, inv_temperature)             -> (loss, stats)
        loss[r]  = w[r] * kl[r] (float32; rows with w == 0 give 0 and, fused, are not read)
        stats[r] = (lse_s, lse_t, kl): log-sum-exp of s / T and of t / T and the unweighted kl (float32)
    grad_student(s, t, stats, g, inv_temperature) -> (q - p) * g / T                       (dtype of s)
    grad_teacher(s, t, stats, g, inv_temperature) -> p * (log p - log q - kl) * g / T      (dtype of t)

with p = softmax(t / T), q = softmax(s / T) and g the per-row float32 cotangent (row weights folded
in). The conventions for -inf, NaN and empty teacher rows are listed in `kl_div_from_logits` and in
kernels/kl_logits.metal; `_Fallback` (composed MLX ops) is the reference implementation of them.

Data flow as for `kl_div_loss`: argument checks and reductions (reused from `losses`) -> one
`mx.custom_function` with vjp/jvp/vmap rules -> (`dispatch.decide` picks) `_Fused` | `_Fallback`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from pathlib import Path
from typing import NamedTuple, Optional

import mlx.core as mx

from . import dispatch, metal
from .losses import _broadcast_shape_and_axis, _check_array, _reduce, _row_weights

STATS = 3  # floats saved per row for the backward: lse_s, lse_t, kl


class _Problem(NamedTuple):
    s: mx.array  # student logits, broadcast and shaped (rows, D)
    t: mx.array  # teacher logits, likewise
    w: Optional[mx.array]  # float32 row weights (rows,), or None
    row_shape: tuple  # shape of the per-row loss
    out_dtype: mx.Dtype
    inv_temperature: float


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real Python number, got {type(temperature).__name__}")
    value = float(temperature)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    inverse = 1.0 / value
    if not math.isfinite(inverse) or inverse == 0.0:
        raise ValueError(f"temperature={temperature!r} is outside the float range its inverse needs")
    return inverse


def _prepare(student_logits, teacher_logits, temperature, axis, reduction, mask) -> _Problem:
    s = _check_array("student_logits", student_logits)
    t = _check_array("teacher_logits", teacher_logits)
    inv_temperature = _check_temperature(temperature)
    shape, axis = _broadcast_shape_and_axis(("student_logits", "teacher_logits"), s, t, axis, reduction)
    row_shape = shape[:axis] + shape[axis + 1 :]
    rows, length = math.prod(row_shape), shape[axis]

    def rows_last(a: mx.array) -> mx.array:
        # A distribution axis other than the last costs one transposed copy (the kernels read rows).
        a = mx.broadcast_to(a, shape)
        if axis != len(shape) - 1:
            a = mx.moveaxis(a, axis, -1)
        return a.reshape(rows, length)

    w = None if mask is None else _row_weights(mask, row_shape).reshape(rows)
    return _Problem(rows_last(s), rows_last(t), w, row_shape, mx.result_type(s.dtype, t.dtype), inv_temperature)


# ----------------------------------------------------------------------------- composed-op backend


class _Fallback:
    """The primitive as composed MLX ops (any device): the reference for the conventions.

    The same arithmetic as the fused forward, in passes: the row maxima, then one compiled graph for
    the three row sums relative to them (sum exp(a - max_s), sum exp(b - max_t) and the cross term
    sum exp(b - max_t) * (b - a)). Two exps per element and no log-softmax: a teacher probability is
    never formed as exp(b - lse_t), whose rounding (eps |lse_t|) would be multiplied by |log p - log q|
    (a 2e-4 relative error at logits of 1e4). The backward recomputes p and q from the saved stats
    (two exps per element) instead of keeping full-size float32 copies from the forward.
    """

    @staticmethod
    def forward(s, t, w, inv_temperature):
        rows, length = s.shape
        if rows == 0 or length == 0:
            # No logits: an empty teacher row has no distribution (the all -inf rule): loss 0.
            stats = mx.broadcast_to(mx.array([-mx.inf, -mx.inf, 0.0], mx.float32), (rows, STATS))
            return mx.zeros((rows,), mx.float32), stats
        inv = mx.array(inv_temperature, mx.float32)
        # max(x * inv) == max(x) * inv exactly (inv > 0, rounding is monotonic): no scaled copy is made.
        max_s = s.max(axis=-1, keepdims=True).astype(mx.float32) * inv
        max_t = t.max(axis=-1, keepdims=True).astype(mx.float32) * inv
        kl, stats = _fallback_kl(s, t, inv, max_s, max_t)
        loss = kl if w is None else _weigh(kl, w)
        return loss, stats

    @staticmethod
    def grad_student(s, t, stats, g, inv_temperature):
        return _fallback_grad_student(s, t, stats, g.astype(mx.float32), mx.array(inv_temperature, mx.float32))

    @staticmethod
    def grad_teacher(s, t, stats, g, inv_temperature):
        return _fallback_grad_teacher(s, t, stats, g.astype(mx.float32), mx.array(inv_temperature, mx.float32))


@mx.compile
def _fallback_kl(s, t, inv, max_s, max_t):
    a, b = s.astype(mx.float32) * inv, t.astype(mx.float32) * inv
    # An all -inf row has max -inf: shift by 0 instead (its exps are 0 either way, and -inf - -inf is NaN).
    max_s = mx.where(max_s == -mx.inf, 0.0, max_s)
    max_t = mx.where(max_t == -mx.inf, 0.0, max_t)
    sum_s = mx.exp(a - max_s).sum(axis=-1)
    e = mx.exp(b - max_t)
    sum_t = e.sum(axis=-1)
    # b == -inf: p = 0 contributes 0 whatever a is; a == -inf under a finite b: the true KL, +inf.
    cross = mx.where(b == -mx.inf, 0.0, mx.where(a == -mx.inf, mx.inf, e * (b - a))).sum(axis=-1)
    max_s, max_t = max_s[:, 0], max_t[:, 0]
    kl = (cross / sum_t - (max_t - max_s)) + (mx.log(sum_s) - mx.log(sum_t))
    # Student row all -inf under a teacher: +inf (the formula gives inf - inf).
    kl = mx.where(sum_s == 0, mx.where(mx.isnan(sum_t) | mx.isnan(cross), mx.nan, mx.inf), kl)
    # Teacher row all -inf: no distribution, kl = 0, unless the student holds a NaN.
    kl = mx.where(sum_t == 0, mx.where(mx.isnan(sum_s), mx.nan, 0.0), kl)
    kl = mx.where(kl < 0.0, 0.0, kl)  # rounding below 0 is clamped; NaN stays NaN
    stats = mx.stack([max_s + mx.log(sum_s), max_t + mx.log(sum_t), kl], axis=1)
    return kl, stats


@mx.compile
def _weigh(kl, w):
    return mx.where(w == 0, 0.0, w * kl)


def _zero_rows(stats, g):
    """Rows whose gradients are exactly 0: zero cotangent or a teacher with no distribution."""
    # mx.logical_or, not `|`: under mx.vmap MLX 0.32 drops the batch axis of `a | b` when only b has one.
    return mx.logical_or(g == 0, stats[:, 1] == -mx.inf)[:, None]


@mx.compile
def _fallback_grad_student(s, t, stats, g, inv):
    a, b = s.astype(mx.float32) * inv, t.astype(mx.float32) * inv
    q = mx.exp(a - stats[:, 0:1])
    p = mx.exp(b - stats[:, 1:2])
    value = (q - p) * (g * inv)[:, None]
    return mx.where(_zero_rows(stats, g), 0.0, value).astype(s.dtype)


@mx.compile
def _fallback_grad_teacher(s, t, stats, g, inv):
    a, b = s.astype(mx.float32) * inv, t.astype(mx.float32) * inv
    log_p = b - stats[:, 1:2]
    value = mx.exp(log_p) * ((log_p - (a - stats[:, 0:1])) - stats[:, 2:3]) * (g * inv)[:, None]
    zero = mx.logical_or(_zero_rows(stats, g), b == -mx.inf)
    return mx.where(zero, 0.0, value).astype(t.dtype)


# ----------------------------------------------------------------------------- fused backend (host side)


def _kernel_file() -> Path:
    return metal.KERNEL_DIR / "kl_logits.metal"


def _split_header(text: str) -> str:
    """The logits-only header: everything above the first kernel section of kl_logits.metal."""
    return text.split("\n" + metal.SECTION, 1)[0] + "\n"


_TEXT = _kernel_file().read_text()
HEADER = metal.HEADER + "\n" + _split_header(_TEXT)
SOURCES = metal.sections(_TEXT)
SIGNATURES = {  # kernel name -> (input names, output names)
    "kl_logits_forward": (["student", "teacher", "w", "inv_temperature"], ["loss", "stats"]),
    "kl_logits_grad_student": (["student", "teacher", "stats", "g", "inv_temperature"], ["ds"]),
    "kl_logits_grad_teacher": (["student", "teacher", "stats", "g", "inv_temperature"], ["dt"]),
}


def kernel(name: str):
    """The kernel object for `name`, built once per kernel factory and cached (see metal.build_kernel)."""
    inputs, outputs = SIGNATURES[name]
    return metal.build_kernel(name, SOURCES[name], inputs, outputs, HEADER)


def _settings() -> dict:
    return {var.name: ("auto" if (value := var.get()) is None else value)
            for var in (metal.THREADGROUP_SIZE, metal.N_READS)}


def _check_rows(rows: int, length: int) -> None:
    if rows > metal.MAX_GRID or length > metal.MAX_GRID:
        raise ValueError(f"the fused logits kernels take up to {metal.MAX_GRID} rows of up to {metal.MAX_GRID} "
                         f"logits, got {rows} x {length}")


def plan_forward(rows: int, length: int, s_dtype, t_dtype, weighted: bool) -> metal.LaunchPlan:
    """The forward launch for (rows, length) logits: one threadgroup per row.

    "block" when one step covers the row (ceil(length / N_READS) threads rounded up to 32), else
    "looped" with 1024 threads; KL_METAL_THREADGROUP_SIZE caps the size, KL_METAL_N_READS sets the step.
    """
    _check_rows(rows, length)
    n_reads = metal.N_READS.get()
    cap = metal.THREADGROUP_SIZE.get() or metal.MAX_THREADS
    size = min(cap, metal.round_up(-(-max(length, 1) // n_reads), metal.SIMD_SIZE))
    variant = "block" if size * n_reads >= length else "looped"
    template = (("S", s_dtype), ("T", t_dtype), ("D", length), ("N_READS", n_reads), ("WEIGHTED", bool(weighted)))
    return metal.LaunchPlan("logits_forward", "kl_logits_forward", variant, (size, rows, 1), (size, 1, 1),
                            template, _settings())


def plan_gradient(which: str, rows: int, length: int, s_dtype, t_dtype) -> metal.LaunchPlan:
    """The elementwise launch of one gradient ("student" or "teacher"): N_READS elements per thread."""
    _check_rows(rows, length)
    n_reads = metal.N_READS.get()
    size = metal.THREADGROUP_SIZE.get() or metal.DEFAULT_THREADS["elementwise"]
    per_row = -(-length // n_reads)
    tx = max(1, min(size, per_row))
    ty = max(1, min(rows, size // tx))
    template = (("S", s_dtype), ("T", t_dtype), ("D", length), ("N_READS", n_reads))
    return metal.LaunchPlan(f"logits_grad_{which}", f"kl_logits_grad_{which}", "elementwise",
                            (per_row, rows, 1), (tx, ty, 1), template, _settings())


class _Fused:
    """The primitive as the kernels of kernels/kl_logits.metal: one launch per call."""


    @staticmethod
    def forward(s, t, w, inv_temperature):
        rows, length = s.shape
        if rows == 0 or length == 0:  # dispatch sends empty arrays to the fallback; kept for direct calls
            return _Fallback.forward(s, t, w, inv_temperature)
        launch = plan_forward(rows, length, s.dtype, t.dtype, w is not None)
        weights = metal.placeholder() if w is None else w.astype(mx.float32)
        loss, stats = kernel(launch.kernel)(
            inputs=[s, t, weights, float(inv_temperature)],
            template=list(launch.template),
            grid=launch.grid,
            threadgroup=launch.threadgroup,
            output_shapes=[(rows,), (rows, STATS)],
            output_dtypes=[mx.float32, mx.float32],
        )
        return loss, stats

    @staticmethod
    def _gradient(which, s, t, stats, g, inv_temperature, dtype):
        rows, length = s.shape
        if rows == 0 or length == 0:
            return mx.zeros(s.shape, dtype)
        launch = plan_gradient(which, rows, length, s.dtype, t.dtype)
        return kernel(launch.kernel)(
            inputs=[s, t, stats, g.astype(mx.float32), float(inv_temperature)],
            template=list(launch.template),
            grid=launch.grid,
            threadgroup=launch.threadgroup,
            output_shapes=[(rows, length)],
            output_dtypes=[dtype],
        )[0]

    @classmethod
    def grad_student(cls, s, t, stats, g, inv_temperature):
        return cls._gradient("student", s, t, stats, g, inv_temperature, s.dtype)

    @classmethod
    def grad_teacher(cls, s, t, stats, g, inv_temperature):
        return cls._gradient("teacher", s, t, stats, g, inv_temperature, t.dtype)


BACKENDS = {"fallback": _Fallback, "fused": _Fused}

# ----------------------------------------------------------------------------- autograd


@functools.lru_cache(maxsize=None)
def primitive(backend):
    """The custom function `kl_logit_rows(s, t, w, inv_temperature) -> (loss, stats)` on `backend`.

    s, t: (rows, D); w: float32 (rows,) or None; inv_temperature: a Python float (no gradient).
    Each gradient is its own lazy node: the teacher's is never computed unless asked for.
    """

    @mx.custom_function
    def kl_logit_rows(s, t, w, inv_temperature):
        # MLX traces this inner graph under mx.jvp too: reading the inputs through stop_gradient keeps
        # it off jvp's tape (a kernel node has no jvp; composed ops would compute unused tangents).
        return backend.forward(mx.stop_gradient(s), mx.stop_gradient(t), w, inv_temperature)

    @kl_logit_rows.vjp
    def kl_logit_rows_vjp(primals, cotangents, outputs):
        s, t, w, inv_temperature = primals
        g = cotangents[0].astype(mx.float32)
        g = g if w is None else g * w
        stats = outputs[1]
        ds = backend.grad_student(s, t, stats, g, inv_temperature)
        dt = backend.grad_teacher(s, t, stats, g, inv_temperature)
        # One gradient per array input (a missing one would make MLX hand back the cotangent itself).
        return (ds, dt) if w is None else (ds, dt, mx.zeros_like(w))

    @kl_logit_rows.jvp
    def kl_logit_rows_jvp(primals, tangents):
        s, t, w, inv_temperature = primals
        ts, tt = tangents[0], tangents[1]
        loss, stats = backend.forward(mx.stop_gradient(s), mx.stop_gradient(t), w, inv_temperature)
        weights = mx.ones(loss.shape, mx.float32) if w is None else w
        tangent = mx.zeros(loss.shape, mx.float32)
        if ts is not None:
            ds = backend.grad_student(s, t, stats, weights, inv_temperature).astype(mx.float32)
            tangent = tangent + (ds * ts.astype(mx.float32)).sum(axis=1)
        if tt is not None:
            dt = backend.grad_teacher(s, t, stats, weights, inv_temperature).astype(mx.float32)
            tangent = tangent + (dt * tt.astype(mx.float32)).sum(axis=1)
        return [tangent, mx.zeros_like(stats)]  # stats are internal: their tangent is never read

    @kl_logit_rows.vmap
    def kl_logit_rows_vmap(inputs, axes):
        s, t, w, inv_temperature = inputs
        arrays = (s, t, w)
        batch = next(a.shape[ax] for a, ax in zip(arrays, axes) if a is not None and ax is not None)

        def merged(a, ax):
            if a is None:
                return None
            a = mx.broadcast_to(a, (batch, *a.shape)) if ax is None else mx.moveaxis(a, ax, 0)
            return a.reshape(batch * a.shape[1], *a.shape[2:])

        s, t, w = (merged(a, ax) for a, ax in zip(arrays, axes))
        rows = s.shape[0] // batch
        loss, stats = kl_logit_rows(s, t, w, inv_temperature)
        return [loss.reshape(batch, rows), stats.reshape(batch, rows, STATS)], [0, 0]

    return kl_logit_rows


def logit_rows(backend, s: mx.array, t: mx.array, w, inv_temperature: float) -> mx.array:
    """Per-row weighted KL from (rows, D) logits, float32 (rows,), differentiable in s and t."""
    return primitive(backend)(s, t, w, inv_temperature)[0]


# ----------------------------------------------------------------------------- public API


def _decide(problem: _Problem) -> dispatch.Decision:
    rows, length = problem.s.shape
    decision = dispatch.decide((rows, length, 1), problem.s.dtype, problem.t.dtype, problem.w is not None)
    if decision.path == "fused" and rows > metal.MAX_GRID:
        why = f"{rows} rows exceed the fused logits kernels' grid ({metal.MAX_GRID})"
        if decision.setting == "fused":
            raise RuntimeError(f"KL_METAL_BACKEND=fused, but the fused kernels can't run here: {why}")
        return dataclasses.replace(decision, path="fallback", reason=why, backend=_Fallback, launch=None,
                                   gradient_launches=())
    if decision.path != "fused":
        return dataclasses.replace(decision, backend=_Fallback)
    dtypes = (problem.s.dtype, problem.t.dtype)
    forward = plan_forward(rows, length, *dtypes, problem.w is not None)
    gradients = tuple(plan_gradient(which, rows, length, *dtypes) for which in ("student", "teacher"))
    return dataclasses.replace(decision, backend=_Fused, launch=forward, gradient_launches=gradients)


def kl_div_from_logits(
    student_logits: mx.array,
    teacher_logits: mx.array,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    reduction: str = "none",
    mask: Optional[mx.array] = None,
) -> mx.array:
    r"""Distillation loss KL(teacher || student) straight from logits, at a softmax temperature.

    Computes, per row along ``axis``, with :math:`p = \mathrm{softmax}(t / T)` (teacher) and
    :math:`q = \mathrm{softmax}(s / T)` (student):

    .. math::

        \ell = \sum_{\text{axis}} p \, (\log p - \log q)
             = \mathbb{E}_p\!\left[\tfrac{t - s}{T}\right] - \mathrm{lse}(t / T) + \mathrm{lse}(s / T)

    the same value as ``kl_div_loss(log_softmax(s / T), log_softmax(t / T))`` without materialising either
    log-softmax: where Metal is the target device, one fused kernel reads each logit once (online max and
    log-sum-exp for both rows plus the cross term) and saves three floats per row for the backward.
    Elsewhere composed MLX ops compute the same (``kl_metal.explain_from_logits`` says which path).

    Args:
        student_logits (array): Logits of the student (the distribution being trained).
        teacher_logits (array): Logits of the teacher; broadcasts with ``student_logits``.
        temperature (float, optional): Keyword only. Softmax temperature ``T``: a finite Python number
            > 0 (no gradient flows into it). Default: ``1.0``.
        axis (int, optional): Keyword only. The vocabulary axis of the broadcast shape. Default: ``-1``.
        reduction (str, optional): Keyword only. ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'none'``.
        mask (array, optional): Keyword only. Bool or floating per-row weights ``w`` (e.g. padding
            positions), as in ``kl_div_loss``: ``'none'`` returns ``w * loss``, ``'sum'``
            ``sum(w * loss)``, ``'mean'`` ``sum(w * loss) / sum(w)`` (0 when every weight is 0). Rows of
            weight 0 give 0 loss and 0 gradients and the fused kernels do not read them.

    Returns:
        array: The per-row loss (``'none'``) or its mean or sum, in ``result_type`` of the two logits'
        dtypes. Every sum accumulates in float32 (also for bfloat16 and float16) and is rounded once.

    Conventions:

    * The loss is **not** multiplied by ``T**2``. Hinton et al.'s distillation loss scales it by
      ``T**2`` so that gradient magnitudes do not shrink as ``T`` grows: multiply it yourself (example).
    * Gradients: d/dstudent = (q - p) * g / T, d/dteacher = p * ((t - s) / T - E) * g / T with
      E = E_p[(t - s) / T], g the per-row cotangent; each only when asked for (a teacher under
      ``mx.stop_gradient`` costs nothing). ``mx.grad``, ``vjp``, ``jvp``, ``vmap`` and ``mx.compile``
      (not shapeless) work.
    * ``-inf`` logits: where the teacher is -inf (probability 0, e.g. a masked vocabulary entry, -inf in
      both) the element contributes 0 and gets 0 gradients. A student -inf under a finite teacher gives
      +inf (the true KL). A teacher row that is all -inf has no distribution: its loss is 0 (NaN if the
      student row holds a NaN) and its gradients are 0. A student row all -inf gives +inf.
    * NaN in either row gives NaN for that row, never a silent 0; +inf logits give NaN.
    * Rounding cannot make the loss negative (it is clamped at 0).
    * A distribution axis other than the last costs one transposed copy of both arguments.
    * Integer, bool and complex arguments are rejected (TypeError), not converted.

    Example:
        >>> import mlx.core as mx, kl_metal
        >>> student, teacher = mx.random.normal((4, 32000)), mx.random.normal((4, 32000))
        >>> T = 2.0
        >>> loss = T**2 * kl_metal.kl_div_from_logits(student, mx.stop_gradient(teacher),
        ...                                           temperature=T, reduction="mean")
    """
    problem = _prepare(student_logits, teacher_logits, temperature, axis, reduction, mask)
    decision = _decide(problem)
    loss = logit_rows(decision.backend, problem.s, problem.t, problem.w, problem.inv_temperature)
    loss = _reduce(loss.reshape(problem.row_shape), problem.w, reduction)
    return loss.astype(problem.out_dtype)


def explain_from_logits(
    student_logits: mx.array,
    teacher_logits: mx.array,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    reduction: str = "none",
    mask: Optional[mx.array] = None,
) -> dispatch.Decision:
    """What `kl_div_from_logits` would do with these arguments: path, why, and the forward launch if fused.

    Validates the arguments exactly as `kl_div_from_logits` does and launches nothing.
    """
    return _decide(_prepare(student_logits, teacher_logits, temperature, axis, reduction, mask))
