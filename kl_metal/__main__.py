"""`python -m kl_metal`: what runs here and why, a self-check against float64, and a small timing table.

Exits with status 1 when the self-check fails. `python -m kl_metal tune --shape ... --dtype ...` sweeps the
fused kernels' launch settings instead (kl_metal/tune.py).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import __version__, config, dispatch, explain, kl_div_loss, metal, tune

CHECK_SHAPE = (16, 4099)  # odd length: exercises partial threadgroups and simdgroups on the fused path
TIMING_SHAPE = (256, 32000)
# Per-dtype tolerance of the self-check, relative to sum |term| of a row (loss) or to |value| (gradients):
# float32 math over 4099 terms is far inside 1e-4; half types add one rounding of the output (2^-11
# float16, 2^-8 bfloat16), and bfloat16 gradients on the composed-op path a second one (exp(t) is kept
# in bfloat16 there): 2 * 2^-8 = 7.8e-3, with half as much again for margin.
TOLERANCE = {mx.float32: 1e-4, mx.float16: 2e-3, mx.bfloat16: 1.2e-2}
# Gradients below a dtype's smallest normal number are compared absolutely (float16 flushes
# exp(t) < 6e-5 to subnormals or 0): the floor of the relative error's denominator.
SMALLEST_NORMAL = {mx.float32: 1.2e-38, mx.float16: 6.1e-5, mx.bfloat16: 1.2e-38}


def say(text: str = "") -> None:
    print(text, flush=True)


@contextlib.contextmanager
def backend_setting(value: str):
    previous = os.environ.get(config.BACKEND.name)
    os.environ[config.BACKEND.name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[config.BACKEND.name]
        else:
            os.environ[config.BACKEND.name] = previous


def oracle(x: np.ndarray, t: np.ndarray):
    """float64 loss per row and both gradients for a unit cotangent, per the documented conventions."""
    zero = t == -np.inf
    p = np.exp(t)
    safe_t = np.where(zero, 0.0, t)
    term = np.where(zero, 0.0, p * (safe_t - x))
    return term.sum(-1), np.abs(term).sum(-1), -p, np.where(zero, 0.0, p * (safe_t - x + 1))


def self_check(path: str, dtype: mx.Dtype) -> bool:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, *CHECK_SHAPE)).astype(np.float32) * 2
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    logp[1, :, ::7] = -np.inf  # zero-probability targets
    x, t = mx.array(logp[0]).astype(dtype), mx.array(logp[1]).astype(dtype)
    with backend_setting(path):
        loss, (dx, dt) = mx.value_and_grad(lambda a, b: kl_div_loss(a, b).astype(mx.float32).sum(), (0, 1))(x, t)
        rows = kl_div_loss(x, t)
    x64, t64 = (np.array(a.astype(mx.float32)).astype(np.float64) for a in (x, t))
    want_rows, magnitude, want_dx, want_dt = oracle(x64, t64)
    tol, floor = TOLERANCE[dtype], SMALLEST_NORMAL[dtype]
    relative = lambda got, want, scale: np.max(np.abs(np.array(got.astype(mx.float32)) - want) / scale)  # noqa: E731
    errors = {
        "loss": relative(rows, want_rows, magnitude),
        "d/dinputs": relative(dx, want_dx, np.maximum(np.abs(want_dx), floor)),
        "d/dtargets": relative(dt, want_dt, np.maximum(np.abs(want_dt), floor)),
    }
    ok = all(e <= tol for e in errors.values()) and np.isfinite(float(loss))
    detail = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    say(f"  {path:8s} {str(dtype).split('.')[-1]:8s} {'PASS' if ok else 'FAIL'}  max relative error: {detail} (tolerance {tol:.1e})")
    return ok


def best_time(fn, *args, repeats: int = 3) -> float:
    mx.eval(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def timing_table(paths) -> None:
    rows, length = TIMING_SHAPE
    say(f"\nTiming, {rows}x{length}, best of 3 on {mx.default_device()} (ratio = reference time / kl_metal time):")
    say(f"  {'dtype':8s} {'pass':22s} {'reference':>10s} " + " ".join(f"{p:>18s}" for p in paths))
    rng = np.random.default_rng(1)
    for dtype in (mx.float32, mx.bfloat16):
        x, t = (mx.array(rng.standard_normal(TIMING_SHAPE).astype(np.float32) - 10).astype(dtype) for _ in range(2))
        for label, make in (
            ("forward", lambda f: f),
            ("value_and_grad(inputs)", lambda f: mx.value_and_grad(lambda a, b: f(a, b).sum())),
            ("value_and_grad(both)", lambda f: mx.value_and_grad(lambda a, b: f(a, b).sum(), (0, 1))),
        ):
            reference = best_time(make(nn.losses.kl_div_loss), x, t)
            cells = []
            for path in paths:
                with backend_setting(path):
                    ours = best_time(make(kl_div_loss), x, t)
                cells.append(f"{ours * 1e3:8.1f} ms x{reference / ours:5.2f}")
            say(f"  {str(dtype).split('.')[-1]:8s} {label:22s} {reference * 1e3:7.1f} ms " + " ".join(cells))


def info(timing: bool = True) -> int:
    say(f"kl_metal {__version__}, MLX {mx.__version__}, Python {sys.version.split()[0]}")
    say(f"default device: {mx.default_device()}; Metal: {mx.metal.is_available()}; CUDA: {mx.cuda.is_available()}")
    example = mx.zeros((8, 32000), mx.bfloat16)
    say("\nkl_div_loss on (8, 32000) bfloat16 here:")
    say("  " + str(explain(example, example)).replace("\n", "\n  "))
    fused, why = metal.available(mx.default_device())
    paths = ["fallback"] + (["fused"] if fused else [])
    if not fused:
        say(f"  (fused kernels not available: {why})")
    say(f"\nSelf-check against a float64 oracle, {CHECK_SHAPE[0]}x{CHECK_SHAPE[1]}, loss and both gradients:")
    ok = all([self_check(path, dtype) for path in paths for dtype in (mx.float32, mx.float16, mx.bfloat16)])
    if timing:
        timing_table(paths)
    say("\nself-check " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kl_metal", description=__doc__.splitlines()[0])
    parser.add_argument("--no-timing", action="store_true", help="skip the timing table")
    commands = parser.add_subparsers(dest="command", metavar="{tune}")
    tune.add_arguments(commands.add_parser(
        "tune", help="find the fastest KL_METAL_* launch settings for one problem",
        description="Sweep the fused kernels' KL_METAL_* launch settings for one problem on this machine, time "
                    "each distinct launch configuration and print the fastest as export lines."))
    args = parser.parse_args(argv)
    for var in config.ALL:  # a malformed KL_METAL_* value is reported before anything runs
        var.get()
    if args.command == "tune":
        return tune.main(args)
    return info(timing=not args.no_timing)


if __name__ == "__main__":
    sys.exit(main())
