"""The one place that decides: fused kernels or the composed-op fallback, and why (`explain`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Optional

import mlx.core as mx

from . import config, fallback, metal

FUSED_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


@dataclass(frozen=True)
class Decision:
    """Which path `kl_div_loss` takes for given arguments, and why.

    `path` is "fused" or "fallback"; `launch` (fused only) is the forward kernel's plan: variant, grid,
    threadgroup and the `KL_METAL_*` values in effect; `gradient_launches` the plans of the d/dinputs and
    d/dtargets kernels; `chunking` (fallback only) how the composed ops cut the work. `str(decision)` reads as a short report.
    """

    path: str
    reason: str
    backend: ModuleType = field(repr=False)
    rows: int
    axis_length: int
    inner: int
    dtypes: tuple
    device: str
    setting: str
    launch: Optional[object] = None
    gradient_launches: tuple = ()
    chunking: Optional[str] = None

    def __str__(self) -> str:
        names = "/".join(str(d).split(".")[-1] for d in self.dtypes)
        lines = [
            f"path: {self.path}",
            f"why: {self.reason}",
            f"problem: {self.rows} rows x {self.axis_length} (reduction axis), inner stride {self.inner}, "
            f"dtypes {names}, device {self.device}",
            f"KL_METAL_BACKEND={self.setting}",
        ]
        if self.chunking is not None:
            lines.append(f"fallback: {self.chunking}")
        if self.launch is not None:
            lines.append("launch settings: " + " ".join(f"{k}={v}" for k, v in self.launch.settings.items()))
        for plan in filter(None, (self.launch, *self.gradient_launches)):
            lines.append(f"kernel: {plan.describe(settings=False)}")
        return "\n".join(lines)


def _fusable(shape: tuple, dtypes: tuple) -> Optional[str]:
    """Why these arguments can't use the fused kernels, or None if they can."""
    for dtype in dtypes:
        if dtype not in FUSED_DTYPES:
            return f"{str(dtype).split('.')[-1]} has no fused kernel (float32, float16, bfloat16 do)"
    if 0 in shape:
        return "the arrays are empty: nothing to launch"
    if max(shape[1:]) > metal.MAX_GRID:
        return f"an axis longer than {metal.MAX_GRID} elements exceeds the fused kernels' grid"
    return None


def decide(shape: tuple, x_dtype: mx.Dtype, t_dtype: mx.Dtype, weighted: bool) -> Decision:
    """Choose the path for arrays of `shape` = (outer, D, inner) reduced over D.

    Reads `KL_METAL_BACKEND` now: "fallback" always takes the composed ops; "fused" takes the kernels or
    raises RuntimeError when they can't run (it never silently falls back); "auto" takes the kernels
    where Metal is the target device and the dtypes and sizes allow.
    """
    setting = config.BACKEND.get()
    device = mx.default_device()
    outer, length, inner = shape
    common = dict(
        rows=outer * inner, axis_length=length, inner=inner, dtypes=(x_dtype, t_dtype),
        device=str(device), setting=setting,
    )
    if setting == "fallback":
        return Decision("fallback", "KL_METAL_BACKEND=fallback", fallback, chunking=fallback.describe(shape),
                        **common)
    present, why_present = metal.available(device)
    why_not = None if present else why_present
    why_not = why_not or _fusable(shape, (x_dtype, t_dtype))
    if why_not is not None:
        if setting == "fused":
            raise RuntimeError(f"KL_METAL_BACKEND=fused, but the fused kernels can't run here: {why_not}")
        return Decision("fallback", why_not, fallback, chunking=fallback.describe(shape), **common)
    forward = metal.plan(shape, x_dtype, t_dtype, weighted)
    gradients = tuple(metal.plan(shape, x_dtype, t_dtype, weighted, op=op) for op in ("grad_inputs", "grad_targets"))
    reason = why_present if setting == "auto" else f"KL_METAL_BACKEND=fused ({why_present})"
    return Decision("fused", reason, metal, launch=forward, gradient_launches=gradients, **common)
