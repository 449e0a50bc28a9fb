"""Numbers derived from a pytest-benchmark run: time, GB/s and the ratios within each group.

Works on the JSON form of the benchmarks (a list of dicts with "group", "stats" and "extra_info"), so the
conftest hook (before the JSON is written) and report.py (reading it) share one definition.
"""
from __future__ import annotations

from typing import Optional

REFERENCE = "reference"
COMPILED_REFERENCE = "reference_compiled"
COPY = "copy"


def seconds(bench: dict) -> float:
    """The time of one evaluation: the fastest timed round (noise on a shared machine only adds time)."""
    return bench["stats"]["min"]


def groups(benchmarks: list) -> dict:
    """Benchmarks by group name, entries keyed by implementation, groups in first-seen order."""
    result: dict = {}
    for bench in benchmarks:
        result.setdefault(bench["group"], {})[bench["extra_info"]["impl"]] = bench
    return result


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def add_derived(benchmarks: list) -> None:
    """Write into each benchmark's extra_info: seconds, gbps, speedup_vs_reference,
    speedup_vs_compiled_reference, peak_memory_vs_reference and fraction_of_copy_bandwidth
    (None where the group lacks that entry). Idempotent."""
    for entries in groups(benchmarks).values():
        reference, compiled, copy = (entries.get(k) for k in (REFERENCE, COMPILED_REFERENCE, COPY))
        copy_gbps = copy["extra_info"]["bytes_moved"] / seconds(copy) / 1e9 if copy else None
        for bench in entries.values():
            info, time = bench["extra_info"], seconds(bench)
            info["seconds"] = time
            info["gbps"] = info["bytes_moved"] / time / 1e9
            info["speedup_vs_reference"] = _ratio(reference and seconds(reference), time)
            info["speedup_vs_compiled_reference"] = _ratio(compiled and seconds(compiled), time)
            info["peak_memory_vs_reference"] = _ratio(
                info["peak_memory_bytes"], reference and reference["extra_info"]["peak_memory_bytes"])
            info["fraction_of_copy_bandwidth"] = _ratio(info["gbps"], copy_gbps)
