"""The benchmark suites' bookkeeping (benchmarks/): presets, bytes moved, the derived ratios, the report,
and that the three implementations of a group compute the same loss and gradients.

The suites themselves run in CI (`KL_METAL_BENCH=smoke python -m pytest benchmarks/`, see .ci/run).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_cases as bc  # noqa: E402
import bench_summary  # noqa: E402
import report  # noqa: E402


def test_preset_switch(monkeypatch):
    monkeypatch.delenv(bc.PRESET_VARIABLE, raising=False)
    assert bc.preset_name() == "small"
    monkeypatch.setenv(bc.PRESET_VARIABLE, " Smoke ")
    assert bc.preset_name() == "smoke"
    monkeypatch.setenv(bc.PRESET_VARIABLE, "huge")
    with pytest.raises(ValueError, match="KL_METAL_BENCH='huge' is not a preset: use one of full, small, smoke"):
        bc.preset_name()


def test_full_preset_has_the_issue_shapes():
    cases = {(c.kind, c.shape, c.dtype, c.axis, c.masked) for c in bc.PRESETS["full"].cases}
    for shape in ((4096, 32000), (8192, 128256), (4096, 151936)):
        assert {("distill", shape, d, -1, False) for d in ("float32", "bfloat16")} <= cases
    assert {("classifier", (65536, 64), "float32", -1, False), ("classifier", (16384, 1000), "float32", -1, False),
            ("axis1", (64, 4096, 512), "float32", 1, False)} <= cases
    assert any(masked for *_, masked in cases)
    for preset in bc.PRESETS.values():  # every preset covers every kind of case
        assert {c.kind for c in preset.cases} == {"distill", "classifier", "axis1", "masked"}


def test_bytes_moved_counts_each_argument_once_and_each_output_once():
    case = bc.Case("distill", (4, 1000), "bfloat16")
    argument = 4 * 1000 * 2
    assert bc.bytes_moved(case, "forward") == 2 * argument + 2
    assert bc.bytes_moved(case, "grad_inputs") == 3 * argument + 2
    assert bc.bytes_moved(case, "grad_both") == 4 * argument + 2
    masked = bc.Case("masked", (2, 3, 5), "float32", axis=1, masked=True)
    assert bc.bytes_moved(masked, "forward") == 2 * 30 * 4 + 10 * 4 + 4  # + float32 weights of 2x5 rows
    with pytest.raises(KeyError):
        bc.bytes_moved(case, "backward")


@pytest.mark.parametrize("case", [
    bc.Case("distill", (4, 1000), "float32"),
    bc.Case("axis1", (2, 64, 16), "float32", axis=1),
    bc.Case("masked", (8, 1000), "float32", masked=True),
], ids=lambda c: c.id)
@pytest.mark.parametrize("pass_name", bc.PASSES)
def test_a_group_compares_like_with_like(case, pass_name):
    """kl_metal, the reference and mx.compile(reference) return the same loss and gradients (finite
    inputs, float32), so the suite times the same computation three ways."""
    args = bc.arrays(case)
    results = [bc.pass_function(impl, case, pass_name)(*args) for impl in bc.IMPLEMENTATIONS]
    flat = [mx.concatenate([leaf.reshape(-1) for _, leaf in tree_flatten(r)]) for r in results]
    for other in flat[1:]:
        np.testing.assert_allclose(np.array(other), np.array(flat[0]), rtol=2e-4, atol=1e-7)
    assert flat[0].size == 1 + {"forward": 0, "grad_inputs": 1, "grad_both": 2}[pass_name] * args[0].size


def test_copy_moves_the_requested_bytes():
    source = bc.copy_source(8000)
    copied = bc.copy_of(source)
    mx.eval(copied)
    assert source.nbytes + copied.nbytes == 8000
    assert bc.peak_memory_delta(bc.evaluator(bc.copy_of, (source,))) >= 4000  # a real copy, not a view


def _bench(group, impl, seconds, nbytes=2_000_000, peak=100, rounds=3, **info):
    return {"group": group, "name": f"{group}-{impl}", "stats": {"min": seconds, "rounds": rounds},
            "extra_info": {"impl": impl, "bytes_moved": nbytes, "peak_memory_bytes": peak, "pass": "forward",
                           "path": "fused" if impl == "kl_metal" else "mlx ops", "variant": None, **info}}


def test_derived_numbers_per_group():
    benchmarks = [
        _bench("a | forward", "kl_metal", 0.002, peak=50),
        _bench("a | forward", "reference", 0.006, peak=200),
        _bench("a | forward", "reference_compiled", 0.004),
        _bench("a | forward", "copy", 0.001),
        _bench("b | forward", "kl_metal", 0.010),
    ]
    bench_summary.add_derived(benchmarks)
    ours = benchmarks[0]["extra_info"]
    assert ours["seconds"] == 0.002
    assert ours["gbps"] == pytest.approx(1.0)  # 2 MB in 2 ms
    assert ours["speedup_vs_reference"] == pytest.approx(3.0)
    assert ours["speedup_vs_compiled_reference"] == pytest.approx(2.0)
    assert ours["peak_memory_vs_reference"] == pytest.approx(0.25)
    assert ours["fraction_of_copy_bandwidth"] == pytest.approx(0.5)
    assert benchmarks[1]["extra_info"]["speedup_vs_reference"] == 1.0
    lonely = benchmarks[4]["extra_info"]  # a group without reference or copy
    assert lonely["speedup_vs_reference"] is None and lonely["fraction_of_copy_bandwidth"] is None


def test_report_writes_the_table(tmp_path):
    data = {"machine_info": {"device_name": "Test CPU", "device": "Device(cpu, 0)", "mlx": "0.32.4",
                             "kl_metal": "0.1.0", "preset": "smoke"},
            "datetime": "2026-01-02T03:04:05",
            "benchmarks": [_bench("distill 4x1000 float32 | forward", "kl_metal", 0.002, peak=50),
                           _bench("distill 4x1000 float32 | forward", "reference", 0.005, peak=200),
                           _bench("distill 4x1000 float32 | forward", "reference_compiled", 0.004),
                           _bench("distill 4x1000 float32 | forward", "copy", 0.001)]}
    results = tmp_path / "run.json"
    results.write_text(json.dumps(data))
    assert report.main([str(results), "--no-chart"]) == 0
    text = (tmp_path / "run.md").read_text()
    assert "Test CPU (Device(cpu, 0)), MLX 0.32.4" in text and "kl_metal path: fused Metal kernels" in text
    assert ("| distill 4x1000 float32 | forward | 2 ms | 5 ms | 4 ms | x2.50 | x2.00 | 1 | 50% | x0.25 |"
            in text.splitlines())


@pytest.mark.parametrize("content, message", [
    ("not json", "is not JSON"),
    (json.dumps({"benchmarks": []}), "holds no benchmarks (was it run with --benchmark-disable?)"),
    (json.dumps({"benchmarks": [{"name": "other", "extra_info": {}}]}), "is not from benchmarks/"),
])
def test_report_rejects_other_files(tmp_path, capsys, content, message):
    results = tmp_path / "bad.json"
    results.write_text(content)
    with pytest.raises(SystemExit) as stop:
        report.main([str(results), "--no-chart"])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_traffic_counts_the_reference_graph_op_by_op():
    """exp(t), t - x, their product (each reads its operands and writes once), then the row sum."""
    import traffic

    case = bc.Case("distill", (4, 1000), "float32")
    args = bc.arrays(case)
    assert traffic.reference_traffic("reference", case, "forward", args) == traffic.Traffic(6, 3)
    # The backward of d/dinputs adds exp(t) * g and its negation.
    assert traffic.reference_traffic("reference", case, "grad_inputs", args) == traffic.Traffic(8, 5)


def test_traffic_rules_refuse_unknown_primitives():
    import traffic

    with pytest.raises(ValueError, match="no rule for MLX primitive 'Gather'"):
        traffic._rule("Gather", [traffic.FULL], 1)
    assert traffic._rule("Contiguous", [traffic.VIEW], 1) == ([traffic.FULL], 0, 1)  # materialises
    assert traffic._rule("Contiguous", [traffic.FULL], 1) == ([traffic.FULL], 0, 0)


def test_traffic_of_the_kernels_from_the_emulator():
    import traffic

    case = bc.Case("masked", (16, 1000), "float32", masked=True)
    launches = traffic.kernel_traffic(case, "grad_inputs", bc.arrays(case))
    assert [(name, full) for name, full, _ in launches] == [
        ("kl_forward_row", traffic.Traffic(1, 0)),  # half the rows are masked: not read
        ("kl_grad_inputs", traffic.Traffic(0.5, 1)),  # reads targets of kept rows, writes every element
    ]
    assert traffic.minimum(case, "grad_inputs", split=True) == traffic.Traffic(1.5, 1)


def test_fused_groups_get_a_copy_entry_and_record_the_variants(emulated_metal, monkeypatch):
    """Under the emulator kl_metal is "fused": the suite adds the speed-of-light copy and records the
    forward and backward kernel variants; with the fallback forced it does neither."""
    monkeypatch.delenv("KL_METAL_BACKEND", raising=False)
    looped = bc.Case("distill", (2, 5000), "float32")
    strided = bc.Case("axis1", (2, 64, 16), "float32", axis=1)
    assert bc.fused_here(looped) and bc.fused_here(strided)
    plan = bc.kl_metal_plan(looped, bc.arrays(looped), "grad_both")
    assert (plan["path"], plan["variant"], plan["backward_variant"]) == ("fused", "looped", "elementwise")
    assert bc.kl_metal_plan(strided, bc.arrays(strided), "forward")["variant"] == "strided"
    monkeypatch.setenv("KL_METAL_BACKEND", "fallback")
    assert not bc.fused_here(looped)
    assert bc.kl_metal_plan(looped, bc.arrays(looped), "grad_both")["variant"] is None
