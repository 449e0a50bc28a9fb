"""Float64 numpy oracle for `kl_div_from_logits` (per-row KL from logits and both gradients), with its
own checks: known values and central finite differences of the gradient formulas.

Independent of kl_metal: the formulas and conventions are written out from the specification
(the docstring of `kl_metal.kl_div_from_logits`), never imported from the code under test.

Error model (for the bounds `loss_tolerance`, `grad_scales`): inputs are rounded to their dtype before
the oracle sees them, so only float32 arithmetic in the code under test remains:
  * a = s / T, b = t / T are formed with one or two roundings (s * float32(1 / T)): relative 2 eps each,
    i.e. absolute 2 eps (|a| + |b|) in any log-probability, covered by the `R` term below;
  * the three row sums (sum exp(a - m), sum exp(b - m), sum exp(b - m) (b - a)) each go through a chain
    of at most `chain` float32 additions/rescalings (Higham: relative error <= chain * eps per sum);
  * a handful of roundings combine them (16 eps of the largest magnitude involved).
"""
from __future__ import annotations

import math

import numpy as np

from _oracle import EPS32, f64

INF = np.inf


def _lse(x: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp in float64: -inf for an all -inf row, NaN if the row holds NaN or +inf."""
    with np.errstate(all="ignore"):
        m = np.max(np.where(np.isnan(x), -INF, x), axis=-1, keepdims=True)
        shift = np.where(np.isfinite(m), m, 0.0)
        lse = shift + np.log(np.exp(x - shift).sum(axis=-1, keepdims=True))
        bad = np.isnan(x).any(axis=-1, keepdims=True) | (x == INF).any(axis=-1, keepdims=True)
    return np.where(bad, np.nan, lse)


class Reference:
    """Everything about (rows, D) logits s (student), t (teacher) at temperature T, in float64."""

    def __init__(self, s, t, temperature: float = 1.0):
        self.T = float(temperature)
        self.a = f64(s) / self.T
        self.b = f64(t) / self.T
        a, b = self.a, self.b
        self.lse_s, self.lse_t = _lse(a), _lse(b)
        with np.errstate(all="ignore"):
            self.log_q = a - self.lse_s
            self.log_p = b - self.lse_t
            self.q = np.where(a == -INF, 0.0, np.exp(self.log_q))
            self.p = np.where(b == -INF, 0.0, np.exp(self.log_p))
            term = np.where(b == -INF, 0.0, np.where(a == -INF, INF, self.p * (self.log_p - self.log_q)))
            kl = term.sum(axis=-1)
            dead = self.lse_t[:, 0] == -INF  # teacher all -inf: no distribution
            kl = np.where(dead, np.where(np.isnan(self.lse_s[:, 0]), np.nan, 0.0), kl)
            self.kl = np.where(kl < 0, 0.0, kl)
            self.dead = dead
            finite_a = np.where(np.isfinite(a), np.abs(a), 0.0)
            finite_b = np.where(np.isfinite(b), np.abs(b), 0.0)
            self.R = 1.0 + finite_a.max(axis=-1, initial=0.0) + finite_b.max(axis=-1, initial=0.0)
            both = np.isfinite(a) & np.isfinite(b)
            self.Ep_absdiff = np.where(both, self.p * np.abs(b - a), 0.0).sum(axis=-1)
            # Errors that are products of two magnitudes (see loss_tolerance).
            gap_t = b - np.max(np.where(np.isnan(b), -INF, b), axis=-1, keepdims=True)
            d = self.log_p - self.log_q - self.kl[:, None]
            products = (4 * np.abs(gap_t) * np.abs(b - a) * self.p + 2 * self.p * np.abs(b) * np.abs(d)
                        + 2 * np.abs(self.q - self.p) * np.abs(a))
            self.products = np.where(both & (self.p > 0), products, 0.0).sum(axis=-1)

    def loss_tolerance(self, chain: int) -> np.ndarray:
        """|float32 kl - kl| bound per row (see the module docstring).

        Additive terms: the sums' chains times their magnitudes, 16 roundings of the largest logit.
        Products (`self.products`): exp(b - max_t) has relative error eps |b - max_t| (its argument's
        rounding), multiplied by |b - a| in the cross term; a = s * float32(1 / T) is off by 2 eps |a|,
        which moves kl by |dkl/da| = |q - p| per unit, and b likewise by p |log p - log q - kl|.
        """
        return EPS32 * ((chain + 16) * (self.Ep_absdiff + 2.0) + 16.0 * self.R + self.products)

    def loss(self, w=None) -> np.ndarray:
        if w is None:
            return self.kl
        w = f64(w)
        with np.errstate(invalid="ignore"):
            return np.where(w == 0, 0.0, w * self.kl)

    def _zero_rows(self, g):
        return (g == 0) | self.dead[:, None]

    def grad_student(self, g) -> np.ndarray:
        """(q - p) * g / T; exactly 0 on rows with g == 0 and rows whose teacher is all -inf."""
        g = f64(g)[:, None]
        with np.errstate(all="ignore"):
            value = (self.q - self.p) * g / self.T
        return np.where(self._zero_rows(g), 0.0, value)

    def grad_teacher(self, g) -> np.ndarray:
        """p * (log p - log q - kl) * g / T, i.e. p * ((t - s) / T - E_p[(t - s) / T]) * g / T;
        exactly 0 where t == -inf, on rows with g == 0 and rows whose teacher is all -inf."""
        g = f64(g)[:, None]
        with np.errstate(all="ignore"):
            value = self.p * (self.log_p - self.log_q - self.kl[:, None]) * g / self.T
        return np.where(self._zero_rows(g) | (self.b == -INF), 0.0, value)

    def grad_scales(self, g, chain: int):
        """Per-element error scales (in units of eps32, see _oracle.assert_grads_close) of both gradients.

        q = exp(a - lse_s) has relative error eps (|a| + |lse_s| + chain + 8) (the argument's rounding,
        the log-sum-exp's chain, exp's ulps); p likewise. The teacher's factor d = log p - log q - kl has
        absolute error eps (|a| + |lse_s| + |b| + |lse_t| + 8) plus the forward's kl error.
        """
        g = np.abs(f64(g))[:, None]
        with np.errstate(all="ignore"):
            abs_a, abs_b = np.abs(self.a), np.abs(self.b)
            lse_s, lse_t = np.abs(self.lse_s), np.abs(self.lse_t)
            rel_q = abs_a + lse_s + chain + 8
            rel_p = abs_b + lse_t + chain + 8
            student = np.where(self.q > 0, self.q * rel_q, 0.0) + np.where(self.p > 0, self.p * rel_p, 0.0)
            student = student * g / self.T
            d = np.abs(self.log_p - self.log_q - self.kl[:, None])
            kl_error = (self.loss_tolerance(chain) / EPS32)[:, None]
            teacher = self.p * (rel_p * d + abs_a + lse_s + abs_b + lse_t + 8 + kl_error) * g / self.T
            # Metal may flush float32 subnormals to zero (exp of arguments below -87 is subnormal): allow
            # an absolute error of two smallest normals wherever p or q is not exactly 0.
            floor = 2 * 2.0**-126 / EPS32 * g / self.T
            mass = (self.p > 0) | (self.q > 0)
            student = student + np.where(mass, floor, 0.0)
            teacher = teacher + np.where(self.p > 0, floor, 0.0)
            zero = self._zero_rows(g) | ~np.isfinite(student)
            student = np.where(zero, 0.0, student)
            teacher = np.where(zero | (self.b == -INF) | ~np.isfinite(teacher), 0.0, teacher)
        return student, teacher


def assert_loss_close(got, ref: np.ndarray, tol: np.ndarray, what: str = "loss"):
    """NaN and infinities exactly where the oracle has them, exact zeros where it demands them
    (tol == 0 marks rows the conventions fix, e.g. masked or teacher-less rows), else |error| <= tol."""
    got = f64(got)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    nan = np.isnan(ref)
    bad = np.flatnonzero(np.isnan(got) != nan)
    assert bad.size == 0, f"{what}: NaN pattern differs at {bad[:5]}: got {got.flat[bad[:5]]}, want {ref.flat[bad[:5]]}"
    inf = np.isinf(ref)
    bad = np.flatnonzero(inf & (got != ref))
    assert bad.size == 0, f"{what}: infinity differs at {bad[:5]}: got {got.flat[bad[:5]]}"
    finite = np.isfinite(ref)
    with np.errstate(all="ignore"):
        err = np.where(finite, np.abs(got - ref), 0.0)
        tol = np.where(finite, tol, np.inf)
    worst = int(np.argmax(err - tol)) if err.size else 0
    assert np.all(err <= tol), (f"{what}: |error| {err.flat[worst]:.3e} > tolerance {tol.flat[worst]:.3e} at "
                                f"{worst} (got {got.flat[worst]!r}, want {ref.flat[worst]!r})")


def random_logits(rng: np.random.Generator, shape, scale: float = 3.0, offset: float = 0.0) -> np.ndarray:
    """float32 logits N(offset, scale^2): a spread like an LM head's."""
    return (rng.standard_normal(shape) * scale + offset).astype(np.float32)


# ----------------------------------------------------------------------------- the oracle's own tests


def test_known_value():
    # MLX's kl_div_loss test: softmax(log([.5, .5])) = [.5, .5] etc.; KL([.2, .8] || [.8, .2]) = 0.831777.
    s = np.log(np.array([[0.5, 0.5], [0.8, 0.2]]))
    t = np.log(np.array([[0.5, 0.5], [0.2, 0.8]]))
    np.testing.assert_allclose(Reference(s, t).kl, [0.0, 0.6 * math.log(4)], atol=1e-15)
    # Shifting either row's logits by a constant changes nothing; T rescales the logits.
    np.testing.assert_allclose(Reference(s + 7, t - 3).kl, Reference(s, t).kl, atol=1e-14)
    np.testing.assert_allclose(Reference(2 * s, 2 * t, 2.0).kl, Reference(s, t).kl, atol=1e-15)


def test_conventions():
    s = np.array([[0.0, 1.0, -INF], [0.0, 1.0, 2.0], [-INF, -INF, -INF], [1.0, np.nan, 2.0], [-INF] * 3])
    t = np.array([[1.0, 0.0, -INF], [-INF] * 3, [0.0, 1.0, 2.0], [-INF] * 3, [-INF] * 3])
    ref = Reference(s, t)
    masked = Reference(s[:1, :2], t[:1, :2]).kl[0]
    np.testing.assert_array_equal(ref.kl, [masked, 0.0, INF, np.nan, 0.0])
    g = np.ones(5)
    np.testing.assert_array_equal(ref.grad_student(g)[1], 0.0)  # no teacher distribution
    np.testing.assert_array_equal(ref.grad_teacher(g)[0, 2], 0.0)  # t == -inf


def _kl_scalar(s, t, T):
    return Reference(s[None], t[None], T).kl[0]


@np.errstate(all="ignore")
def test_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    for T in (1.0, 0.7, 2.5):
        s, t = rng.standard_normal(6) * 2, rng.standard_normal(6) * 2
        g = 1.3
        ref = Reference(s[None], t[None], T)
        ds, dt = ref.grad_student(np.array([g]))[0], ref.grad_teacher(np.array([g]))[0]
        h = 1e-6
        for j in range(6):
            e = np.zeros(6)
            e[j] = h
            fd_s = (_kl_scalar(s + e, t, T) - _kl_scalar(s - e, t, T)) / (2 * h) * g
            fd_t = (_kl_scalar(s, t + e, T) - _kl_scalar(s, t - e, T)) / (2 * h) * g
            assert abs(fd_s - ds[j]) < 1e-7, (T, j, fd_s, ds[j])
            assert abs(fd_t - dt[j]) < 1e-7, (T, j, fd_t, dt[j])
        # The teacher gradient's two forms agree: p ((t - s) / T - E_p[(t - s) / T]) / T.
        d = (t - s) / T
        expectation = (ref.p[0] * d).sum()
        np.testing.assert_allclose(dt, ref.p[0] * (d - expectation) * g / T, atol=1e-14)
