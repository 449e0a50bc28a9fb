"""pytest-benchmark hooks of the kl_metal suites: the preset in the header, versions in machine_info, and
the derived numbers (GB/s, ratios to the group's reference) written into extra_info before JSON save."""
from __future__ import annotations

import platform

import mlx.core as mx

import bench_cases
import bench_summary
import kl_metal


def pytest_report_header(config):
    name = bench_cases.preset_name()
    return (f"kl_metal benchmarks: preset {name} ({bench_cases.PRESET_VARIABLE}), "
            f"{bench_cases.PRESETS[name].rounds} timed rounds, device {mx.default_device()}")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["mlx"] = mx.__version__
    machine_info["kl_metal"] = kl_metal.__version__
    machine_info["preset"] = bench_cases.preset_name()
    machine_info["device"] = str(mx.default_device())
    on_gpu = mx.default_device().type == mx.gpu
    if on_gpu and mx.metal.is_available():
        machine_info["device_name"] = mx.metal.device_info().get("device_name", "Metal GPU")
    elif on_gpu:
        machine_info["device_name"] = "CUDA GPU"
    else:
        cpu = machine_info.get("cpu", {})
        machine_info["device_name"] = f"{cpu.get('brand_raw') or platform.machine()}, {cpu.get('count', '?')} cores"


def pytest_benchmark_update_json(config, benchmarks, output_json):
    bench_summary.add_derived(output_json["benchmarks"])
