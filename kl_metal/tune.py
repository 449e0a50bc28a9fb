"""`python -m kl_metal tune`: find the fastest `KL_METAL_*` launch settings of the fused kernels for one
problem on this machine.

    python -m kl_metal tune --shape 8192x128256 --dtype bfloat16 [--axis -1] [--pass grad_inputs]
                            [--sweep KL_METAL_N_READS=2,4,8 ...] [--repeats 10]

Every combination of the candidate values (CANDIDATES, or the `--sweep` lists) is turned into the launch
plans it would produce (`metal.plan`, no launch); combinations with identical plans are timed once, as
one candidate. The first candidate (every setting's first value: the defaults unless `--sweep` lists
others first) is the baseline: each other candidate's results must match it (a launch setting must
never change the answer). Each is timed as the fastest of `--repeats` evaluations after a warm-up and
reported as it finishes; the winner is printed as `export` lines. Exits 1 where the fused kernels
can't run here.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx

from . import metal
from .config import EnvVar
from .losses import explain, kl_div_loss

DTYPES = ("float32", "float16", "bfloat16")
PASSES = {
    "forward": "the loss only",
    "grad_inputs": "loss and d/dinputs (distillation: the teacher under stop_gradient)",
    "grad_both": "loss, d/dinputs and d/dtargets",
}
# Values tried per setting; None is "automatic". The setting's default is always tried first.
CANDIDATES = {
    "KL_METAL_THREADGROUP_SIZE": (None, 64, 128, 256, 512, 1024),
    "KL_METAL_N_READS": (1, 2, 4, 8, 16),
    "KL_METAL_SMALL_ROWS_PER_THREADGROUP": (None, 1, 2, 4, 8, 16, 32),
    "KL_METAL_SMALL_MAX_D": (0, 32, 64, 128, 256, 512, 1024),
    "KL_METAL_BLOCK_MAX_D": (0, 1024, 2048, 4096, 8192, 16384),
}
# Largest difference from the default settings' results, relative to their largest magnitude, that a
# candidate may show: summation order may change (float32 accumulation), plus one output rounding.
TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}

Settings = dict  # KL_METAL_* name -> value (None: automatic)


@dataclass
class Candidate:
    settings: Settings
    launches: tuple  # the LaunchPlans it produces
    seconds: Optional[float] = None
    problem: Optional[str] = None  # why it was rejected, if it was


# ----------------------------------------------------------------------------- arguments


def parse_shape(text: str) -> tuple:
    """'8192x128256' -> (8192, 128256); ArgumentTypeError quoting the value otherwise."""
    parts = text.lower().split("x")
    if not all(p.strip().isdigit() for p in parts) or any(int(p) == 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"--shape {text!r} is invalid: expected positive integers separated by 'x', e.g. 8192x128256")
    return tuple(int(p) for p in parts)


def _setting(name: str) -> EnvVar:
    for var in metal.SETTINGS:
        if var.name == name:
            return var
    raise argparse.ArgumentTypeError(
        f"--sweep {name!r}: not a launch setting; known: {', '.join(v.name for v in metal.SETTINGS)}")


def parse_sweep(text: str) -> tuple:
    """'KL_METAL_N_READS=2,4' -> ('KL_METAL_N_READS', (2, 4)); 'auto' stands for automatic."""
    name, sep, values = text.partition("=")
    var = _setting(name.strip())
    if not sep or not values.strip():
        raise argparse.ArgumentTypeError(f"--sweep {text!r} is invalid: expected NAME=VALUE[,VALUE...]")
    parsed = []
    for raw in values.split(","):
        raw = raw.strip()
        if raw == "auto" and var.default is None:
            parsed.append(None)
            continue
        try:
            parsed.append(var.parse(raw))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--sweep {text!r}: {raw!r} is not valid for {var.name} (allowed: {var.allowed})") from None
    return var.name, tuple(dict.fromkeys(parsed))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", type=parse_shape, required=True, help="e.g. 8192x128256 (rows x vocabulary)")
    parser.add_argument("--dtype", choices=DTYPES, required=True, help="dtype of inputs and targets")
    parser.add_argument("--axis", type=int, default=-1, help="the distribution axis (default -1)")
    parser.add_argument("--pass", dest="pass_name", choices=PASSES, default="grad_inputs",
                        help="what is timed: " + "; ".join(f"{k}: {v}" for k, v in PASSES.items())
                        + " (default grad_inputs)")
    parser.add_argument("--sweep", type=parse_sweep, action="append", default=[], metavar="NAME=V1,V2",
                        help="sweep only these settings over these values (repeatable; 'auto' = automatic); "
                             "the others keep their current value")
    parser.add_argument("--repeats", type=int, default=10, help="timed evaluations per candidate (default 10)")


# ----------------------------------------------------------------------------- candidates


def _text(value) -> str:
    return "auto" if value is None else str(value)


@contextlib.contextmanager
def environment(settings: Settings):
    """Set the KL_METAL_* variables (None: empty, i.e. automatic) and restore them afterwards."""
    previous = {name: os.environ.get(name) for name in settings}
    try:
        for name, value in settings.items():
            os.environ[name] = "" if value is None else str(value)
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def sweep_values(sweeps: list) -> dict:
    """Setting name -> values to try, the default first. All settings unless `sweeps` names some."""
    if sweeps:
        return dict(sweeps)
    values = {}
    for var in metal.SETTINGS:
        tried = CANDIDATES.get(var.name, ())
        values[var.name] = (var.default,) + tuple(v for v in tried if v != var.default)
    return values


def _launches(kernel_shape: tuple, dtype, pass_name: str) -> tuple:
    ops = ["row_loss"] + {"forward": [], "grad_inputs": ["grad_inputs"],
                          "grad_both": ["grad_inputs", "grad_targets"]}[pass_name]
    plans = (metal.plan(kernel_shape, dtype, dtype, False, op=op) for op in ops)
    return tuple((p.kernel, p.variant, p.grid, p.threadgroup, p.template, p.launches) for p in plans)


def candidates(values: dict, kernel_shape: tuple, dtype, pass_name: str) -> tuple:
    """(distinct candidates, number of combinations): one candidate per distinct set of launch plans."""
    names = list(values)
    combinations = list(itertools.product(*(values[n] for n in names)))
    distinct: dict = {}
    for combination in combinations:
        settings = dict(zip(names, combination))
        with environment(settings):
            launches = _launches(kernel_shape, dtype, pass_name)
        distinct.setdefault(launches, Candidate(settings, launches))
    return list(distinct.values()), len(combinations)


# ----------------------------------------------------------------------------- measuring


def _inputs(shape: tuple, dtype, axis: int) -> tuple:
    def log_probabilities(seed):
        logits = mx.random.normal(shape, key=mx.random.key(seed)) * 2
        return (logits - mx.logsumexp(logits, axis=axis, keepdims=True)).astype(dtype)

    x, t = log_probabilities(0), log_probabilities(1)
    mx.eval(x, t)
    return x, t


def _pass_function(pass_name: str, axis: int) -> Callable:
    def loss(x, t):
        return kl_div_loss(x, t, axis, "mean")

    if pass_name == "forward":
        return loss
    return mx.value_and_grad(loss, 0 if pass_name == "grad_inputs" else (0, 1))


def _bytes_moved(args: tuple, pass_name: str) -> int:
    """The minimum (as in benchmarks/): read inputs and targets once, write each gradient once."""
    gradients = {"forward": 0, "grad_inputs": 1, "grad_both": 2}[pass_name]
    return (2 + gradients) * args[0].nbytes


def _flat(result) -> list:
    if isinstance(result, mx.array):
        return [result]
    return [leaf for part in result for leaf in _flat(part)]


def _difference(result: list, baseline: list) -> float:
    """Largest |result - baseline| relative to the baseline's largest magnitude, over all outputs."""
    worst = 0.0
    for got, want in zip(result, baseline):
        got, want = got.astype(mx.float32), want.astype(mx.float32)
        scale = max(mx.abs(want).max().item(), 1e-30)
        worst = max(worst, mx.abs(got - want).max().item() / scale)
    return worst


def _best_time(run: Callable, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure(candidate: Candidate, fn: Callable, args: tuple, baseline: Optional[list], tolerance: float,
            repeats: int) -> list:
    """Check `candidate` against the baseline's results and time it (fills .seconds or .problem);
    returns its results (a baseline for the others when it is the first)."""
    with environment(candidate.settings):
        try:
            result = _flat(fn(*args))
            mx.eval(result)  # warm-up: compiles this candidate's kernels
        except Exception as error:  # a launch the device refuses (e.g. too many threads): not a winner
            candidate.problem = f"failed: {type(error).__name__}: {error}"
            return []
        if baseline is not None:
            difference = _difference(result, baseline)
            if not difference <= tolerance:
                candidate.problem = f"rejected: results differ from the baseline's by {difference:.1e} (> {tolerance:.0e})"
                return result
        candidate.seconds = _best_time(lambda: mx.eval(fn(*args)), repeats)
    return result


# ----------------------------------------------------------------------------- the command


def _describe(candidate: Candidate, baseline: Settings) -> str:
    """The settings that differ from the baseline's, and the forward launch they give."""
    changed = [f"{n.replace('KL_METAL_', '')}={_text(v)}" for n, v in candidate.settings.items() if v != baseline[n]]
    forward = candidate.launches[0]
    return f"{' '.join(changed) or 'baseline'} (forward {forward[1]}, threadgroup {forward[3][0]}x{forward[3][1]})"


def _baseline_text(settings: Settings) -> str:
    return " ".join(f"{n.replace('KL_METAL_', '')}={_text(v)}" for n, v in settings.items())


def _kernel_shape(shape: tuple, axis: int) -> tuple:
    axis %= len(shape)
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def run(shape: tuple, dtype_name: str, axis: int = -1, pass_name: str = "grad_inputs", sweeps=(),
        repeats: int = 10, say: Callable[[str], None] = print) -> int:
    """Sweep, time and print; returns the exit status (0: a winner was printed)."""
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"--axis {axis} is out of range for --shape {'x'.join(map(str, shape))}")
    if repeats < 1:
        raise ValueError(f"--repeats {repeats} is invalid: at least 1")
    present, why = metal.available(mx.default_device())
    if not present:
        say(f"No fused backend here ({why}): there are no launch settings to tune.")
        return 1
    dtype = getattr(mx, dtype_name)
    values = sweep_values(list(sweeps))
    kernel_shape = _kernel_shape(shape, axis)
    found, combinations = candidates(values, kernel_shape, dtype, pass_name)
    args = _inputs(shape, dtype, axis)
    decision = explain(*args, axis)
    if decision.path != "fused":
        say(f"kl_div_loss takes the {decision.path} path for this problem ({decision.reason}): nothing to tune.")
        return 1

    shape_text = "x".join(map(str, shape))
    say(f"Tuning kl_div_loss on {shape_text} {dtype_name} (axis {axis}), pass {pass_name}: "
        f"{PASSES[pass_name]}, device {mx.default_device()}")
    say(f"{combinations} setting combinations give {len(found)} distinct launch configurations; each is "
        f"checked against the baseline ({_baseline_text(found[0].settings)}) and timed as the fastest of "
        f"{repeats} after a warm-up; GB/s counts the minimum bytes (both arguments read, each gradient "
        f"written once).")
    fn, baseline, best = _pass_function(pass_name, axis), None, None
    labels = [_describe(candidate, found[0].settings) for candidate in found]
    width, count = max(map(len, labels)), len(found)
    for index, (candidate, label) in enumerate(zip(found, labels), 1):
        result = measure(candidate, fn, args, baseline, TOLERANCE[dtype_name], repeats)
        if baseline is None and candidate.problem is None:
            baseline = result
        outcome = candidate.problem or (f"{candidate.seconds * 1e3:9.3f} ms "
                                        f"{_bytes_moved(args, pass_name) / candidate.seconds / 1e9:8.3g} GB/s")
        if candidate.seconds is not None and (best is None or candidate.seconds < best.seconds):
            best = candidate
            outcome += "  (best so far)"
        say(f"[{index:{len(str(count))}d}/{count}] {label:{width}s}  {outcome}")

    if best is None:
        say("No candidate ran: nothing to recommend.")
        return 1
    first = found[0].seconds
    if best is found[0]:
        versus = ": the baseline itself"
    else:
        versus = f", x{first / best.seconds:.2f} faster than the baseline" if first else ""
    say(f"\nWinner: {best.seconds * 1e3:.3f} ms{versus}. For this shape and dtype on this machine:")
    for name, value in best.settings.items():
        say(f"export {name}=" + ("  # empty: automatic" if value is None else str(value)))
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        return run(args.shape, args.dtype, args.axis, args.pass_name, args.sweep, args.repeats)
    except ValueError as error:
        raise SystemExit(f"python -m kl_metal tune: error: {error}") from None
