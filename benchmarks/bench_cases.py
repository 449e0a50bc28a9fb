"""What the benchmark suites measure: the cases of each preset, the three implementations, the passes,
and how bytes moved and peak memory are counted. Used by `test_bench_kl_div.py`.

Definitions (also in README.md, "Benchmarks"):

* bytes moved: the minimum any implementation must move: read `inputs` and `targets` (and the mask)
  once, write what the pass returns once (the loss, and each gradient asked for). Effective GB/s is
  bytes moved / time; an implementation that makes extra passes shows it as lower GB/s.
* time: the fastest of the timed rounds (the benchmark machine is shared; noise only adds time).
* peak memory: `mx.get_peak_memory()` during one evaluation, after `mx.reset_peak_memory()`, minus the
  memory already held before it (the inputs): what the pass allocates, outputs included.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

import kl_metal

PRESET_VARIABLE = "KL_METAL_BENCH"
PASSES = ("forward", "grad_inputs", "grad_both")
IMPLEMENTATIONS = ("kl_metal", "reference", "reference_compiled")
COPY = "copy"  # the speed-of-light entry of a group, on the fused path only
REDUCTION = "mean"  # what a training loop differentiates


@dataclass(frozen=True)
class Case:
    """One problem: a kind (distill, classifier, axis1, masked), a shape, a dtype and the reduced axis."""

    kind: str
    shape: tuple
    dtype: str  # an mlx.core dtype name: "float32", "bfloat16", "float16"
    axis: int = -1
    masked: bool = False  # half of the rows (every second row) carry mask weight 0

    @property
    def label(self) -> str:
        axis = f" axis {self.axis}" if self.axis != -1 else ""
        return f"{self.kind} {'x'.join(map(str, self.shape))} {self.dtype}{axis}"

    @property
    def id(self) -> str:
        return self.label.replace(" ", "-")


@dataclass(frozen=True)
class Preset:
    cases: tuple
    rounds: int  # timed rounds per benchmark (after one untimed warm-up that also compiles)


def _distill(rows_by_vocab, dtypes=("float32", "bfloat16")):
    return tuple(Case("distill", shape, dtype) for shape in rows_by_vocab for dtype in dtypes)


PRESETS = {
    # Apple silicon with >= 64 GB: the shapes. 8192x128256 float32 is 4.2 GB per argument.
    "full": Preset(
        _distill([(4096, 32000), (8192, 128256), (4096, 151936)])
        + (Case("classifier", (65536, 64), "float32"), Case("classifier", (16384, 1000), "float32"),
           Case("axis1", (64, 4096, 512), "float32", axis=1),
           Case("masked", (4096, 32000), "bfloat16", masked=True)),
        rounds=20,
    ),
    # A 2-core CPU in a few minutes: the same vocabularies and layouts with fewer rows (~4M elements),
    # and 2048x32000 (65M elements), the size at which the fallback must match the reference on a CPU.
    "small": Preset(
        _distill([(128, 32000), (32, 128256), (32, 151936), (2048, 32000)])
        + (Case("classifier", (65536, 64), "float32"), Case("classifier", (4096, 1000), "float32"),
           Case("axis1", (2, 4096, 512), "float32", axis=1),
           Case("masked", (128, 32000), "bfloat16", masked=True)),
        rounds=5,
    ),
    # CI: tiny shapes that still reach every fused variant (small, block, looped, strided) and the mask.
    "smoke": Preset(
        _distill([(4, 1000), (2, 5000)])
        + (Case("classifier", (64, 64), "float32"), Case("classifier", (16, 1000), "float32"),
           Case("axis1", (2, 64, 16), "float32", axis=1),
           Case("masked", (8, 1000), "bfloat16", masked=True)),
        rounds=2,
    ),
}


def preset_name() -> str:
    """The preset chosen by KL_METAL_BENCH (default: small); ValueError naming the variable if unknown."""
    name = os.environ.get(PRESET_VARIABLE, "").strip().lower() or "small"
    if name not in PRESETS:
        raise ValueError(
            f"{PRESET_VARIABLE}={os.environ[PRESET_VARIABLE]!r} is not a preset: use one of {', '.join(PRESETS)}"
        )
    return name


# ----------------------------------------------------------------------------- inputs


def _log_probabilities(shape, axis, dtype, seed) -> mx.array:
    logits = mx.random.normal(shape, key=mx.random.key(seed)) * 2
    return (logits - mx.logsumexp(logits, axis=axis, keepdims=True)).astype(getattr(mx, dtype))


def row_shape(case: Case) -> tuple:
    """The shape of the per-row loss: the case's shape without the reduced axis."""
    return tuple(s for i, s in enumerate(case.shape) if i != case.axis % len(case.shape))


@functools.lru_cache(maxsize=1)  # the tests of one case run one after another; hold one case at a time
def arrays(case: Case) -> tuple:
    """(inputs, targets) or (inputs, targets, row weights), evaluated: log-probabilities along the axis."""
    x = _log_probabilities(case.shape, case.axis, case.dtype, seed=0)
    t = _log_probabilities(case.shape, case.axis, case.dtype, seed=1)
    result = (x, t)
    if case.masked:
        rows = row_shape(case)
        keep = (mx.arange(math.prod(rows)) % 2 == 0).reshape(rows)  # every second row masked
        result += (keep.astype(mx.float32),)
    mx.eval(*result)
    return result


# ----------------------------------------------------------------------------- implementations


def loss_function(impl: str, case: Case) -> Callable:
    """The scalar loss of `impl` on the case's arrays (x, t[, w]), reduced with REDUCTION."""
    if impl == "kl_metal":
        if case.masked:
            return lambda x, t, w: kl_metal.kl_div_loss(x, t, case.axis, REDUCTION, mask=w)
        return lambda x, t: kl_metal.kl_div_loss(x, t, case.axis, REDUCTION)
    if impl in ("reference", "reference_compiled"):
        if case.masked:  # what a user of the reference writes for per-row weights
            return lambda x, t, w: (nn.losses.kl_div_loss(x, t, case.axis) * w).sum() / w.sum()
        return lambda x, t: nn.losses.kl_div_loss(x, t, case.axis, REDUCTION)
    raise ValueError(f"impl={impl!r} is not one of {', '.join(IMPLEMENTATIONS)}")


def pass_function(impl: str, case: Case, pass_name: str) -> Callable:
    """The function one benchmark round evaluates: the loss, or value_and_grad w.r.t. inputs or both."""
    if pass_name not in PASSES:
        raise ValueError(f"pass_name={pass_name!r} is not one of {', '.join(PASSES)}")
    loss = loss_function(impl, case)
    if pass_name == "forward":
        fn = loss
    else:
        fn = mx.value_and_grad(loss, 0 if pass_name == "grad_inputs" else (0, 1))
    return mx.compile(fn) if impl == "reference_compiled" else fn


def bytes_moved(case: Case, pass_name: str) -> int:
    """Minimum bytes: read every argument once, write the loss and each requested gradient once."""
    itemsize = getattr(mx, case.dtype).size
    argument = math.prod(case.shape) * itemsize
    mask = math.prod(row_shape(case)) * 4 if case.masked else 0  # float32 row weights
    gradients = {"forward": 0, "grad_inputs": 1, "grad_both": 2}[pass_name]
    return 2 * argument + mask + itemsize + gradients * argument  # itemsize: the scalar loss


def copy_source(nbytes: int) -> mx.array:
    """The speed-of-light entry's input: copying it (read + write) moves `nbytes` (rounded down to 8)."""
    source = mx.zeros((max(1, nbytes // 8),), mx.int32)
    mx.eval(source)
    return source


def copy_of(source: mx.array) -> mx.array:
    """An MLX copy: astype between 4-byte types runs MLX's copy kernel (it never aliases the input)."""
    return source.astype(mx.uint32)


# ----------------------------------------------------------------------------- measurements


def evaluator(fn: Callable, args: tuple) -> Callable[[], None]:
    """What one round runs: build the graph and evaluate it (MLX is lazy: the eval is the work)."""

    def run() -> None:
        mx.eval(fn(*args))

    return run


def peak_memory_delta(run: Callable[[], None]) -> int:
    """Bytes allocated at the peak of one `run()` beyond what was held before it."""
    mx.synchronize()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    run()
    mx.synchronize()
    return max(0, mx.get_peak_memory() - held)


def kl_metal_plan(case: Case, args: tuple, pass_name: str) -> dict:
    """Path, reason and kernel variants kl_metal takes for this case (from `kl_metal.explain`)."""
    mask = args[2] if case.masked else None
    decision = kl_metal.explain(args[0], args[1], case.axis, REDUCTION, mask=mask)
    info = {"path": decision.path, "reason": decision.reason, "variant": None}
    if decision.launch is not None:
        info["variant"] = decision.launch.variant
        if pass_name != "forward":
            info["backward_variant"] = _backward_variant(decision, args)
    return info


def _backward_variant(decision, args) -> str:
    from kl_metal import metal

    outer = decision.rows // decision.inner
    shape = (outer, decision.axis_length, decision.inner)
    return metal.plan(shape, args[0].dtype, args[1].dtype, False, op="grad_inputs").variant


def fused_here(case: Case) -> bool:
    """Whether kl_metal takes its fused kernels for this case here: the groups that get a speed-of-light
    copy entry. Decided on unevaluated arrays, so nothing is allocated."""
    x = mx.zeros(case.shape, getattr(mx, case.dtype))
    mask = mx.ones(row_shape(case)) if case.masked else None
    return kl_metal.explain(x, x, case.axis, REDUCTION, mask=mask).path == "fused"
