"""The fused path: load `kernels/`, build cached kernel objects, choose variants and launch grids.

Seam for tests: `set_kernel_factory(factory)` routes kernel construction through a callable with the
signature of `mx.fast.metal_kernel` (the Metal-on-CPU emulator in tests/ uses it) and makes the fused
backend count as present. Nothing else in kl_metal knows about the emulator.

Backend contract (shared with `fallback.py`): arrays arrive broadcast and shaped (outer, D, inner), the
reduction runs over axis 1. `row_loss` launches one forward kernel, `grad_inputs` / `grad_targets` one
elementwise kernel each. Every launch is described by a `LaunchPlan` from `plan()`, which is also what
`explain()` shows, so the two cannot disagree.

Forward variants (by D and layout, as MLX's own row reductions):
  small    inner == 1, D <= KL_METAL_SMALL_MAX_D: a segment of <= 32 lanes per row, several rows per
           threadgroup, no threadgroup memory.
  block    inner == 1, D <= KL_METAL_BLOCK_MAX_D: one threadgroup per row sized to read the row in one
           step (ceil(D / N_READS) threads rounded up to 32, at most the threadgroup size).
  looped   inner == 1, larger D: one threadgroup per row (1024 threads by default) looping over the row.
  strided  inner > 1: threadgroups of (columns x depth) threads reading coalesced along inner.
block and looped share one kernel body (kl_forward_row); only the launch shape differs.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .config import integer, register

_lock = threading.Lock()
_kernel_factory = None  # None: mx.fast.metal_kernel, only where Metal is available
_kernels: dict = {}  # (factory, kernel name) -> kernel object


def set_kernel_factory(factory):
    """Build kernels with `factory` instead of `mx.fast.metal_kernel`; None restores. Returns the previous one."""
    global _kernel_factory
    with _lock:
        previous, _kernel_factory = _kernel_factory, factory
        _kernels.clear()
    return previous


def available(device: mx.Device) -> tuple[bool, str]:
    """Whether fused kernels can run for `device`, and why (a short phrase)."""
    if _kernel_factory is not None:
        return True, "an injected kernel factory is installed"
    if not mx.metal.is_available():
        return False, "this MLX build has no Metal back-end"
    if device.type != mx.gpu:
        return False, f"the target device is {device}, not the Metal GPU"
    return True, "Metal is available on the target device"


# ----------------------------------------------------------------------------- launch-grid settings

THREADGROUP_SIZE = register(integer(
    "KL_METAL_THREADGROUP_SIZE", None, 1, 1024,
    "threads per threadgroup: the size of the looped kernel, the cap of the block kernel (which takes "
    "ceil(D / N_READS) rounded up to 32), the size (columns x depth) of the strided and backward "
    "kernels, and the default rows x threads of the small kernel; unset: 1024 looped, 256 otherwise. "
    "Need not be a multiple of 32",
))
N_READS = register(integer(
    "KL_METAL_N_READS", 4, 1, 16,
    "consecutive elements each thread reads per step (forward) or handles (backward)",
))
SMALL_ROWS_PER_THREADGROUP = register(integer(
    "KL_METAL_SMALL_ROWS_PER_THREADGROUP", None, 1, 1024,
    "rows per threadgroup of the small-D kernel (capped so a threadgroup has at most 1024 threads); "
    "unset: threadgroup size (default 256) / threads per row",
))
SMALL_MAX_D = register(integer(
    "KL_METAL_SMALL_MAX_D", 128, 0, 4096,
    "largest D (last-axis reduction) that uses the small kernel: one simdgroup or less per row, "
    "several rows per threadgroup; 0 disables it",
))
BLOCK_MAX_D = register(integer(
    "KL_METAL_BLOCK_MAX_D", 4096, 0, 2**31 - 1,
    "largest D (last-axis reduction) that uses the block kernel (one threadgroup per row, one step); "
    "above it the looped kernel (one threadgroup per row looping over it)",
))
SETTINGS = (THREADGROUP_SIZE, N_READS, SMALL_ROWS_PER_THREADGROUP, SMALL_MAX_D, BLOCK_MAX_D)

SIMD_SIZE = 32
MAX_THREADS = 1024  # Metal's maxTotalThreadsPerThreadgroup upper bound
MAX_GRID = 2**31 - 1  # mx.fast.metal_kernel takes grid sizes as C int
MAX_AXIS = 2**31 - 1  # D is an int template argument; D and inner also become grid sizes
MAX_ROWS_PER_LAUNCH = 2**30  # outer is split into launches of at most this many rows beyond MAX_GRID
DEFAULT_THREADS = {"looped": 1024, "strided": 256, "elementwise": 256, "small": 256}

# ----------------------------------------------------------------------------- kernel sources

SECTION = "// ---- kernel: "


def _kernel_dir() -> Path:
    """kernels/ inside an installed wheel (kl_metal/kernels) or a source checkout (../kernels)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels", here.parent / "kernels"):
        if (candidate / "kl_common.h").is_file():
            return candidate
    raise FileNotFoundError(f"kl_metal kernel sources not found next to {here}")


def sections(text: str) -> dict[str, str]:
    """Split a .metal file into kernel bodies: each starts at a '// ---- kernel: NAME ----' line."""
    bodies: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        if line.startswith(SECTION):
            name = line[len(SECTION):].strip().strip("-").strip()
            bodies[name] = ""
        elif name is not None:
            bodies[name] += line
    for name, body in bodies.items():
        # MLX adds `<input>_shape/_strides/_ndim` parameters when those strings occur in a body.
        for word in ("_shape", "_strides", "_ndim"):
            if word in body:
                raise ValueError(f"kernel body {name} mentions {word!r}, which changes MLX's signature")
    return bodies


KERNEL_DIR = _kernel_dir()
HEADER = (KERNEL_DIR / "kl_common.h").read_text()
SOURCES = {
    **sections((KERNEL_DIR / "kl_forward.metal").read_text()),
    **sections((KERNEL_DIR / "kl_backward.metal").read_text()),
}
_SIGNATURES = {  # kernel name -> (input names, output names)
    "kl_forward_small": (["x", "t", "w", "inner"], ["loss"]),
    "kl_forward_row": (["x", "t", "w", "inner"], ["loss"]),
    "kl_forward_strided": (["x", "t", "w", "inner"], ["loss"]),
    "kl_grad_inputs": (["t", "g", "inner"], ["dx"]),
    "kl_grad_targets": (["x", "t", "g", "inner"], ["dt"]),
}


def build_kernel(name: str, source: str, input_names, output_names, header: str):
    """A kernel object built once per kernel factory and cached (thread-safe).

    The factory is `mx.fast.metal_kernel` unless `set_kernel_factory` installed another (which clears
    the cache). Every kl_metal kernel, the logits ones included, is built here."""
    with _lock:
        factory = _kernel_factory or mx.fast.metal_kernel
        key = (factory, name)
        built = _kernels.get(key)
        if built is None:
            built = factory(
                name=name,
                input_names=list(input_names),
                output_names=list(output_names),
                source=source,
                header=header,
                ensure_row_contiguous=True,
            )
            _kernels[key] = built
        return built


def kernel(name: str):
    """The kernel object for `name` ("kl_forward_row", ...), built once per factory and cached (thread-safe).

    Launch it with a plan's `template`, `grid` and `threadgroup` (tests and benchmarks do, e.g. the
    emulator's sparse launches)."""
    inputs, outputs = _SIGNATURES[name]
    return build_kernel(name, SOURCES[name], inputs, outputs, HEADER)


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class LaunchPlan:
    """One kernel launch: which kernel, its variant, grid (in threads), threadgroup and template."""

    op: str  # "row_loss" | "grad_inputs" | "grad_targets"
    kernel: str
    variant: str
    grid: tuple
    threadgroup: tuple
    template: tuple  # (name, value) pairs passed to the kernel
    settings: dict = field(default_factory=dict)  # KL_METAL_* name -> value in effect ("auto" if unset)
    launches: int = 1  # > 1 when outer is split to keep grid sizes within C int

    def describe(self, settings: bool = True) -> str:
        """One line: op, kernel and variant, grid, threadgroup, specialization and (optionally) settings."""
        spec = ", ".join(f"{k}={_template_text(v)}" for k, v in self.template)
        env = " " + " ".join(f"{k}={v}" for k, v in self.settings.items()) if settings else ""
        split = f" x{self.launches} launches" if self.launches > 1 else ""
        return (f"{self.op}: {self.kernel} ({self.variant}) grid={self.grid} "
                f"threadgroup={self.threadgroup}{split} [{spec}]{env}")


def _template_text(value) -> str:
    if isinstance(value, mx.Dtype):
        return str(value).replace("mlx.core.", "")
    return str(value)


def _settings() -> dict:
    """Every launch-grid variable with the value in effect now (read at call time, validated)."""
    return {var.name: ("auto" if (value := var.get()) is None else value) for var in SETTINGS}


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_shape(shape) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ValueError(f"kl_metal.metal expects (outer, D, inner) arrays, got shape {tuple(shape)}")
    outer, d, inner = (int(s) for s in shape)
    if d > MAX_AXIS or inner > MAX_AXIS:
        raise ValueError(f"axis lengths up to {MAX_AXIS} are supported by the fused kernels, got {tuple(shape)}")
    return outer, d, inner


def plan(shape, x_dtype, t_dtype, weighted, *, op: str = "row_loss", out_dtype=None) -> LaunchPlan:
    """The launch `op` would make for arrays of `shape` (outer, D, inner): no launch, no allocation.

    op: "row_loss" (default; `weighted` says whether row weights are given), "grad_inputs" (out_dtype:
    the gradient's dtype, default x_dtype) or "grad_targets". Reads the KL_METAL_* variables now and
    raises ValueError naming any that is malformed or out of range.
    """
    outer, d, inner = _check_shape(shape)
    settings = _settings()
    n_reads = N_READS.get()
    threads = THREADGROUP_SIZE.get()
    split_rows = outer if outer <= MAX_GRID else MAX_ROWS_PER_LAUNCH
    launches = -(-outer // split_rows) if outer else 1
    rows = min(outer, split_rows)  # rows (outer indices) per launch

    if op == "row_loss":
        template = [("X", x_dtype), ("T", t_dtype), ("D", d), ("N_READS", n_reads),
                    ("WEIGHTED", bool(weighted))]
        if inner > 1:
            width = min(inner, SIMD_SIZE)
            size = threads or DEFAULT_THREADS["strided"]
            depth = max(1, min(d, size // width))
            width = min(width, size)  # a threadgroup size below 32 narrows the columns too
            return LaunchPlan(op, "kl_forward_strided", "strided", (inner, depth, rows),
                              (width, depth, 1), tuple(template), settings, launches)
        if d <= SMALL_MAX_D.get():
            threads_per_row = min(SIMD_SIZE, _next_power_of_two(-(-d // n_reads)))
            per_group = SMALL_ROWS_PER_THREADGROUP.get()
            if per_group is None:
                per_group = max(1, (threads or DEFAULT_THREADS["small"]) // threads_per_row)
            per_group = max(1, min(per_group, MAX_THREADS // threads_per_row, rows))
            template.append(("THREADS_PER_ROW", threads_per_row))
            return LaunchPlan(op, "kl_forward_small", "small", (threads_per_row, rows, 1),
                              (threads_per_row, per_group, 1), tuple(template), settings, launches)
        if d <= BLOCK_MAX_D.get():
            size = min(MAX_THREADS, round_up(-(-d // n_reads), SIMD_SIZE))
            if threads is not None:
                size = min(size, threads)
            variant = "block" if size * n_reads >= d else "looped"
        else:
            size = threads or DEFAULT_THREADS["looped"]
            variant = "looped"
        return LaunchPlan(op, "kl_forward_row", variant, (size, rows, 1), (size, 1, 1),
                          tuple(template), settings, launches)

    if op not in ("grad_inputs", "grad_targets"):
        raise ValueError(f"unknown op {op!r}")
    if out_dtype is None:
        out_dtype = x_dtype if op == "grad_inputs" else t_dtype
    template = [("T", t_dtype), ("OUT", out_dtype), ("D", d), ("N_READS", n_reads),
                ("STRIDED", inner > 1)]
    if op == "grad_targets":
        template.insert(0, ("X", x_dtype))
    size = threads or DEFAULT_THREADS["elementwise"]
    if inner > 1:
        steps = -(-d // n_reads)
        tx = min(size, inner)
        ty = max(1, min(steps, size // tx))
        grid, group = (inner, steps, rows), (tx, ty, 1)
        variant = "elementwise strided"
    else:
        per_row = -(-d // n_reads)
        tx = min(size, per_row)
        ty = max(1, min(rows, size // tx))
        grid, group = (per_row, rows, 1), (tx, ty, 1)
        variant = "elementwise"
    return LaunchPlan(op, "kl_" + op, variant, grid, group, tuple(template), settings, launches)


# ----------------------------------------------------------------------------- launches

@functools.lru_cache(maxsize=None)
def placeholder():
    """A 1-element float32 array standing in for w when there are no row weights (never read)."""
    return mx.ones((1,), dtype=mx.float32)


def _launch(launch: LaunchPlan, inputs, output_shape, output_dtype):
    return kernel(launch.kernel)(
        inputs=inputs,
        template=list(launch.template),
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=[output_shape],
        output_dtypes=[output_dtype],
    )[0]


def _per_launch(shape, launch: LaunchPlan, **plan_args):
    """(start, stop, plan) per launch: one unless outer exceeds the grid limit, then chunks of outer,
    each with its own plan (the last chunk is smaller)."""
    outer, d, inner = shape
    if launch.launches == 1:
        return [(0, outer, launch)]
    step = MAX_ROWS_PER_LAUNCH
    return [(start, min(outer, start + step), plan((min(outer, start + step) - start, d, inner), **plan_args))
            for start in range(0, outer, step)]


def row_loss(x: mx.array, t: mx.array, w):
    """Per-row loss w * sum_d exp(t) * (t - x) in float32, shape (outer, inner); saved = ().

    Conventions (kernels/kl_common.h, identical to fallback.py): t == -inf contributes 0 unless x is NaN;
    rows with w == 0 give exactly 0 and are not read.
    """
    outer, d, inner = _check_shape(x.shape)
    plan_args = dict(x_dtype=x.dtype, t_dtype=t.dtype, weighted=w is not None)
    launch = plan(x.shape, **plan_args)
    if outer * inner == 0 or d == 0:
        return mx.zeros((outer, inner), dtype=mx.float32), ()
    weights = placeholder() if w is None else w.astype(mx.float32)
    parts = []
    for start, stop, chunk in _per_launch(x.shape, launch, **plan_args):
        whole = chunk is launch
        xs, ts = (x, t) if whole else (x[start:stop], t[start:stop])
        ws = weights if (w is None or whole) else weights[start:stop]
        parts.append(_launch(chunk, [xs, ts, ws, inner], (stop - start, inner), mx.float32))
    return (parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)), ()


def _grad(op: str, x, t: mx.array, g: mx.array, dtype) -> mx.array:
    outer, d, inner = _check_shape(t.shape)
    plan_args = dict(x_dtype=x.dtype if x is not None else dtype, t_dtype=t.dtype, weighted=False, op=op,
                     out_dtype=dtype)
    launch = plan(t.shape, **plan_args)
    if t.size == 0:
        return mx.zeros(t.shape, dtype=dtype)
    g = g.astype(mx.float32)
    parts = []
    for start, stop, chunk in _per_launch(t.shape, launch, **plan_args):
        whole = chunk is launch
        ts, gs = (t, g) if whole else (t[start:stop], g[start:stop])
        inputs = [ts, gs, inner] if x is None else [x if whole else x[start:stop], ts, gs, inner]
        parts.append(_launch(chunk, inputs, (stop - start, d, inner), dtype))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


def regroup_saved(saved: tuple, batch: int, shape: tuple) -> tuple:
    """Nothing is saved: nothing to regroup under `mx.vmap` (see fallback.regroup_saved)."""
    return ()


def grad_inputs(t: mx.array, g: mx.array, saved, dtype) -> mx.array:
    """d loss / d inputs = -exp(t) * g, shape of t, dtype `dtype`; exactly 0 where t == -inf or g == 0."""
    return _grad("grad_inputs", None, t, g, dtype)


def grad_targets(x: mx.array, t: mx.array, g: mx.array, saved) -> mx.array:
    """d loss / d targets = exp(t) * (t - x + 1) * g, shape/dtype of t; exactly 0 where t == -inf or g == 0."""
    return _grad("grad_targets", x, t, g, t.dtype)
