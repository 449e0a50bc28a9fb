"""Markdown table and bar chart of a kl_metal pytest-benchmark run.

    python benchmarks/report.py results.json [--markdown results.md] [--chart results.png] [--no-chart]

Reads the JSON that `pytest benchmarks/ --benchmark-json=results.json` writes and produces, per group
(case x pass): the time of each implementation, kl_metal's speedup over `mlx.nn.losses.kl_div_loss` and
over `mx.compile` of it, kl_metal's effective GB/s, its share of an MLX copy's bandwidth (fused path
only) and its peak memory relative to the reference. The chart (matplotlib, the `bench` extra) shows
the speedups. Definitions: benchmarks/bench_cases.py and README.md, "Benchmarks".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_summary  # noqa: E402

KL_METAL = "kl_metal"
TICKS = (1 / 16, 1 / 8, 0.25, 0.35, 0.5, 0.7, 1, 1.4, 2, 3, 4, 6, 8, 12, 16, 32)
PATH_NAMES = {"fused": "fused Metal kernels", "fallback": "fallback (composed MLX ops)"}


def load(path: Path) -> dict:
    """The run's JSON with derived numbers added; ValueError when it holds no timed kl_metal benchmarks."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"results file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"results file {str(path)!r} is not JSON: {error}") from None
    benchmarks = data.get("benchmarks") if isinstance(data, dict) else None
    if not benchmarks:
        raise ValueError(f"results file {str(path)!r} holds no benchmarks (was it run with --benchmark-disable?)")
    for bench in benchmarks:
        if "impl" not in bench.get("extra_info", {}):
            raise ValueError(f"benchmark {bench.get('name')!r} in {str(path)!r} is not from benchmarks/ "
                             "(its extra_info has no 'impl')")
    bench_summary.add_derived(benchmarks)
    return data


def rows(data: dict) -> list[dict]:
    """One dict per group that has a kl_metal entry, in run order."""
    result = []
    for group, entries in bench_summary.groups(data["benchmarks"]).items():
        ours = entries.get(KL_METAL)
        if ours is None:
            continue
        info = ours["extra_info"]
        time = {impl: bench["extra_info"]["seconds"] for impl, bench in entries.items()}
        result.append({
            "case": group.split(" | ")[0], "pass": info["pass"], "path": info["path"],
            "variant": info.get("variant"), "kl_metal": time[KL_METAL],
            "reference": time.get(bench_summary.REFERENCE),
            "compiled": time.get(bench_summary.COMPILED_REFERENCE),
            "speedup": info["speedup_vs_reference"], "speedup_compiled": info["speedup_vs_compiled_reference"],
            "compiled_speedup": (entries[bench_summary.COMPILED_REFERENCE]["extra_info"]["speedup_vs_reference"]
                                 if bench_summary.COMPILED_REFERENCE in entries else None),
            "gbps": info["gbps"], "copy_fraction": info["fraction_of_copy_bandwidth"],
            "memory_ratio": info["peak_memory_vs_reference"],
        })
    if not result:
        raise ValueError("no group has a kl_metal entry")
    return result


def _ms(seconds) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.3g} ms"


def _times(value) -> str:
    return "—" if value is None else f"x{value:.2f}"


def _percent(value) -> str:
    return "—" if value is None else f"{value:.0%}"


def describe_run(data: dict) -> str:
    """One line: device, versions, preset, rounds and kl_metal's path(s)."""
    machine = data.get("machine_info", {})
    paths = sorted({b["extra_info"]["path"] for b in data["benchmarks"] if b["extra_info"]["impl"] == KL_METAL})
    rounds = sorted({b["stats"]["rounds"] for b in data["benchmarks"]})
    return (f"{machine.get('device_name', '?')} ({machine.get('device', '?')}), MLX {machine.get('mlx', '?')}, "
            f"kl_metal {machine.get('kl_metal', '?')}, preset {machine.get('preset', '?')}, "
            f"{'/'.join(map(str, rounds))} timed rounds, {data.get('datetime', '')[:10]}; "
            f"kl_metal path: {', '.join(PATH_NAMES.get(p, p) for p in paths)}")


def markdown(data: dict) -> str:
    lines = [
        f"Run: {describe_run(data)}.",
        "",
        "| case | pass | kl_metal | reference | mx.compile(reference) | kl_metal speedup vs reference "
        "| vs compiled reference | kl_metal GB/s | % of copy bandwidth | peak memory vs reference |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows(data):
        lines.append(
            f"| {row['case']} | {row['pass']} | {_ms(row['kl_metal'])} | {_ms(row['reference'])} "
            f"| {_ms(row['compiled'])} | {_times(row['speedup'])} | {_times(row['speedup_compiled'])} "
            f"| {row['gbps']:.3g} | {_percent(row['copy_fraction'])} | {_times(row['memory_ratio'])} |"
        )
    return "\n".join(lines) + "\n"


def chart(data: dict, path: Path) -> None:
    """Horizontal bars: kl_metal's and mx.compile(reference)'s speedup over the reference, per group."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the chart needs matplotlib: pip install '.[bench]' (or pass --no-chart)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator

    table = rows(data)
    labels = [f"{r['case']} | {r['pass']}" for r in table]
    series = [("kl_metal", [r["speedup"] or 0 for r in table]),
              ("mx.compile(reference)", [r["compiled_speedup"] or 0 for r in table])]
    height = 0.38
    figure, axes = plt.subplots(figsize=(10, 1.2 + 0.32 * len(table)))
    for index, (name, values) in enumerate(series):
        positions = [i + (index - 0.5) * height for i in range(len(table))]
        axes.barh(positions, values, height=height, label=name)
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_yticks(range(len(table)), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xscale("log", base=2)
    shown = [v for _, values in series for v in values if v > 0] + [1.0]
    axes.set_xticks([t for t in TICKS if min(shown) / 1.3 <= t <= max(shown) * 1.3])
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xlabel("speedup over mlx.nn.losses.kl_div_loss (reference time / time; > 1 is faster)")
    axes.set_title(describe_run(data).replace("; ", "\n"), fontsize=8)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/report.py", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON from `pytest benchmarks/`")
    parser.add_argument("--markdown", type=Path, help="markdown output (default: RESULTS with .md)")
    parser.add_argument("--chart", type=Path, help="PNG output (default: RESULTS with .png)")
    parser.add_argument("--no-chart", action="store_true", help="write the markdown only")
    args = parser.parse_args(argv)
    try:
        data = load(args.results)
        text = markdown(data)
    except ValueError as error:
        parser.error(str(error))
    markdown_path = args.markdown or args.results.with_suffix(".md")
    markdown_path.write_text(text)
    print(text)
    print(f"wrote {markdown_path}")
    if not args.no_chart:
        chart_path = args.chart or args.results.with_suffix(".png")
        chart(data, chart_path)
        print(f"wrote {chart_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
