"""kl_metal.kl_div_loss beside mlx.nn.losses.kl_div_loss and mx.compile of it, one pytest-benchmark group
per case x pass. KL_METAL_BENCH=small|full|smoke picks the cases (bench_cases.PRESETS).

    KL_METAL_BENCH=small python -m pytest benchmarks/ --benchmark-json=results.json
    python benchmarks/report.py results.json

Each benchmark records in extra_info what it ran (path, kernel variant, device), bytes moved and peak
memory; conftest.py adds time, GB/s and the ratios to the group's reference before the JSON is saved.
"""
from __future__ import annotations

import mlx.core as mx
import pytest

import bench_cases as bc

PRESET = bc.PRESETS[bc.preset_name()]


def _parameters():
    for case in PRESET.cases:
        entries = bc.IMPLEMENTATIONS + ((bc.COPY,) if bc.fused_here(case) else ())
        for pass_name in bc.PASSES:
            for impl in entries:
                yield pytest.param(case, pass_name, impl, id=f"{case.id}-{pass_name}-{impl}")


def _group(case: bc.Case, pass_name: str) -> str:
    return f"{case.label} | {pass_name}"


@pytest.mark.parametrize("case, pass_name, impl", list(_parameters()))
def test_kl_div(benchmark, case, pass_name, impl):
    args = bc.arrays(case)
    info = {"impl": impl, "case": case.kind, "shape": list(case.shape), "dtype": case.dtype, "axis": case.axis,
            "masked": case.masked, "pass": pass_name, "device": str(mx.default_device()),
            "bytes_moved": bc.bytes_moved(case, pass_name)}
    if impl == bc.COPY:
        source = bc.copy_source(info["bytes_moved"])
        run = bc.evaluator(bc.copy_of, (source,))
        info.update(path="mlx copy", variant=None, bytes_moved=8 * source.size)
    else:
        run = bc.evaluator(bc.pass_function(impl, case, pass_name), args)
        if impl == "kl_metal":
            info.update(bc.kl_metal_plan(case, args, pass_name))
        else:
            info.update(path="mx.compile" if impl == "reference_compiled" else "mlx ops", variant=None)

    run()  # warm-up: compiles (mx.compile graphs, Metal kernels) outside the timed rounds
    info["peak_memory_bytes"] = bc.peak_memory_delta(run)
    benchmark.group = _group(case, pass_name)
    benchmark.extra_info.update(info)
    benchmark.pedantic(run, rounds=PRESET.rounds, iterations=1)
