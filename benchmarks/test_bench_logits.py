"""kl_metal.kl_div_from_logits beside the composed reference (log_softmax + mlx.nn.losses.kl_div_loss), mx.compile
of it and, where Metal is present, mlx-lm's fused kernel (`mlx_lm.tuner.losses.kl_div_loss`, the `peer` extra).
One pytest-benchmark group per distillation case x pass, with the conventions of test_bench_kl_div.py
(bench_cases: presets, bytes moved, peak memory, the speed-of-light copy entry on the fused path;
conftest.py: GB/s and the ratios to the group's "reference" entry).

    KL_METAL_BENCH=small python -m pytest benchmarks/test_bench_logits.py --benchmark-json=logits.json
    python benchmarks/report.py logits.json

Inputs are logits N(0, 2^2) at temperature 1 (mlx-lm has no temperature). Passes: "forward" (the mean
loss) and "grad_student" (value and gradient w.r.t. the student, the teacher under mx.stop_gradient: a
distillation step). Bytes moved: read both logits once, write the loss (and the student's gradient).
"""
from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn
import pytest

import bench_cases as bc
import kl_metal.logits as klogits

PRESET = bc.PRESETS[bc.preset_name()]
CASES = tuple(case for case in PRESET.cases if case.kind == "distill")
PASSES = ("forward", "grad_student")
PEER = "mlx_lm"
REDUCTION = "mean"


def peer_loss():
    """mlx-lm's fused KL (its own Metal kernels), or None where Metal or mlx-lm is missing."""
    if not mx.metal.is_available():
        return None
    try:
        from mlx_lm.tuner.losses import kl_div_loss
    except ImportError:
        return None
    return kl_div_loss


def implementations() -> tuple:
    return ("kl_metal", bc.IMPLEMENTATIONS[1], bc.IMPLEMENTATIONS[2]) + ((PEER,) if peer_loss() else ())


@functools.lru_cache(maxsize=1)  # one case at a time
def logit_arrays(case: bc.Case) -> tuple:
    s = (mx.random.normal(case.shape, key=mx.random.key(0)) * 2).astype(getattr(mx, case.dtype))
    t = (mx.random.normal(case.shape, key=mx.random.key(1)) * 2).astype(getattr(mx, case.dtype))
    mx.eval(s, t)
    return s, t


def loss_function(impl: str):
    if impl == "kl_metal":
        return lambda s, t: klogits.kl_div_from_logits(s, t, reduction=REDUCTION)
    if impl in bc.IMPLEMENTATIONS[1:]:  # what a user writes today
        return lambda s, t: nn.losses.kl_div_loss(nn.log_softmax(s, axis=-1), nn.log_softmax(t, axis=-1),
                                                  reduction=REDUCTION)
    if impl == PEER:
        peer = peer_loss()
        return lambda s, t: peer(s, t).mean()
    raise ValueError(f"impl={impl!r} is unknown")


def pass_function(impl: str, pass_name: str):
    loss = loss_function(impl)
    if pass_name == "forward":
        fn = loss
    else:
        fn = mx.value_and_grad(lambda s, t: loss(s, mx.stop_gradient(t)))
    return mx.compile(fn) if impl == bc.IMPLEMENTATIONS[2] else fn


def _parameters():
    for case in CASES:
        fused = klogits.explain_from_logits(mx.zeros(case.shape, getattr(mx, case.dtype)),
                                            mx.zeros(case.shape, getattr(mx, case.dtype))).path == "fused"
        for pass_name in PASSES:
            for impl in implementations() + ((bc.COPY,) if fused else ()):
                yield pytest.param(case, pass_name, impl, id=f"logits-{case.id}-{pass_name}-{impl}")


@pytest.mark.parametrize("case, pass_name, impl", list(_parameters()))
def test_kl_div_from_logits(benchmark, case, pass_name, impl):
    args = logit_arrays(case)
    moved = bc.bytes_moved(case, "forward" if pass_name == "forward" else "grad_inputs")
    info = {"impl": impl, "case": "logits " + case.kind, "shape": list(case.shape), "dtype": case.dtype,
            "axis": -1, "masked": False, "pass": pass_name, "device": str(mx.default_device()),
            "bytes_moved": moved}
    if impl == bc.COPY:
        source = bc.copy_source(moved)
        run = bc.evaluator(bc.copy_of, (source,))
        info.update(path="mlx copy", variant=None, bytes_moved=8 * source.size)
    else:
        run = bc.evaluator(pass_function(impl, pass_name), args)
        if impl == "kl_metal":
            decision = klogits.explain_from_logits(*args, reduction=REDUCTION)
            info.update(path=decision.path, reason=decision.reason,
                        variant=decision.launch.variant if decision.launch is not None else None)
        elif impl == PEER:
            info.update(path="mlx-lm metal_kernel", variant="1024 threads, two passes")
        else:
            info.update(path="mx.compile" if impl == bc.IMPLEMENTATIONS[2] else "mlx ops", variant=None)

    run()  # warm-up: compiles outside the timed rounds
    info["peak_memory_bytes"] = bc.peak_memory_delta(run)
    benchmark.group = f"logits {case.label} | {pass_name}"
    benchmark.extra_info.update(info)
    benchmark.pedantic(run, rounds=PRESET.rounds, iterations=1)
