"""Memory traffic per input element, hardware-independent: kl_metal's kernels (measured by the Metal
emulator's traffic mode) beside MLX's reference op graph and the minimum. Prints a markdown table.

    python benchmarks/traffic.py

Counts are elements of full-size arrays (the rows x vocabulary `inputs`, `targets`, their gradients and
full-size intermediates) read and written per element of `inputs`, for one evaluation of each pass:

* kl_metal: every kernel launch's buffers, as the emulator counted them (repeats included). Row-sized
  buffers (per-row cotangent `g`, mask weights `w`) are listed apart: they are 1/D of the data.
* the reference (`mlx.nn.losses.kl_div_loss`, uncompiled and under `mx.compile`), and kl_metal's
  composed-op fallback: counted from the op graph MLX builds for the pass (`mx.export_to_dot`), one
  kernel per primitive, each reading its full-size inputs once and writing its full-size outputs once
  (the model of MLX's evaluator; reshapes, copies, broadcasts and stop_gradient move nothing).
* minimum: read `inputs` and `targets` once, write each requested gradient once. A backward pass can
  only start once the cotangent exists, so kernels split into forward and backward need at least one
  more read of what the backward uses (`targets` for d/dinputs; both for d/dtargets).
"""
from __future__ import annotations

import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]  # bench_cases; the emulator is test infrastructure
sys.path.append(str(HERE.parent))  # kl_metal from this checkout when it is not installed

import mlx.core as mx  # noqa: E402

import bench_cases as bc  # noqa: E402

# One case per forward kernel variant (float32; counts are in elements, so the dtype doesn't matter).
CASES = (
    ("small (D=64)", bc.Case("classifier", (64, 64), "float32")),
    ("block (D=1000)", bc.Case("classifier", (16, 1000), "float32")),
    ("looped (D=5000)", bc.Case("distill", (4, 5000), "float32")),
    ("strided (axis 1 of 2x64x16)", bc.Case("axis1", (2, 64, 16), "float32", axis=1)),
    ("block, half the rows masked", bc.Case("masked", (16, 1000), "float32", masked=True)),
)
GRADIENTS = {"forward": 0, "grad_inputs": 1, "grad_both": 2}


def minimum(case: bc.Case, pass_name: str, split: bool) -> "Traffic":
    """Read both arguments of the kept rows once, write every gradient element once; `split`: the
    backward reads again what it needs (targets for d/dinputs, both for d/dtargets) of the kept rows."""
    kept = 0.5 if case.masked else 1.0  # masked rows (weight 0) need not be read, their gradients are 0
    gradients = GRADIENTS[pass_name]
    backward_reads = gradients if split else 0  # targets for d/dinputs; inputs and targets for both
    reads = (2 + backward_reads) * kept
    return Traffic(reads, gradients)

# ----------------------------------------------------------------------------- op-graph counting

NO_TRAFFIC = {"Copy", "Reshape", "ExpandDims", "Squeeze", "StopGradient", "Transpose", "Depends"}
REDUCTIONS = {"Sum", "Max", "Min", "Prod", "LogSumExp", "ArgMax", "ArgMin"}
ELEMENTWISE = {"Exp", "Log", "Log1p", "Add", "Subtract", "Multiply", "Divide", "Negative", "Abs", "Square",
               "Equal", "NotEqual", "Less", "LessEqual", "Greater", "GreaterEqual", "Select", "BitwiseOr",
               "BitwiseAnd", "LogicalOr", "LogicalAnd", "LogicalNot", "Maximum", "Minimum", "AsType", "Full",
               "Power", "Sqrt", "Rsqrt", "Sigmoid"}
FULL, VIEW, SMALL = "full", "view", "small"  # a full-size buffer; a full-shape view of row data; row data


@dataclass
class Traffic:
    reads: float = 0.0  # elements of full-size arrays read, per input element
    writes: float = 0.0

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.reads + other.reads, self.writes + other.writes)

    def __str__(self) -> str:
        return f"{_number(self.reads)} / {_number(self.writes)}"


def _number(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _parse_dot(text: str):
    """Primitives in the order MLX writes them (inputs before use): [(label, inputs, outputs)]."""
    labels = dict(re.findall(r'\{ (\d+) \[label ="([^"]+)"', text))
    inputs, outputs = {p: [] for p in labels}, {p: [] for p in labels}
    for source, target in re.findall(r'^("[^"]+"|\d+) -> ("[^"]+"|\d+)$', text, flags=re.M):
        if source in labels:
            outputs[source].append(target.strip('"'))
        else:
            inputs[target].append(source.strip('"'))
    return [(labels[p], inputs[p], outputs[p]) for p in labels]


def _rule(label: str, classes: list, n_outputs: int) -> tuple:
    """(output classes, full-size elements read, written) of one primitive whose inputs have `classes`."""
    if label in NO_TRAFFIC:
        return [classes[0]] * n_outputs, 0, 0
    if label == "CustomTransforms":  # hands back its function's outputs: the last n_outputs inputs
        return classes[-n_outputs:], 0, 0
    if label == "Broadcast":
        return [FULL if classes[0] == FULL else VIEW], 0, 0
    if label == "Contiguous":  # a copy only when the input is a broadcast view (ours are contiguous)
        return [FULL if classes[0] != SMALL else SMALL], 0, int(classes[0] == VIEW)
    reads = classes.count(FULL)  # a broadcast view's data is row-sized: not counted
    if label in REDUCTIONS:
        return [SMALL] * n_outputs, reads, 0
    if label in ELEMENTWISE or label.startswith("Compiled"):
        out = FULL if (FULL in classes or VIEW in classes) else SMALL
        return [out] * n_outputs, reads, n_outputs if out == FULL else 0
    raise ValueError(f"traffic.py has no rule for MLX primitive {label!r}: add it to a set above")


def graph_traffic(outputs: dict, full_sources: dict) -> Traffic:
    """Full-size elements read and written by evaluating `outputs` (name -> lazy array), per element of
    the full-size arrays `full_sources` (name -> array, all of one size), by the rules in the docstring."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "graph.dot"
        mx.export_to_dot(str(path), **outputs, **full_sources)
        primitives = _parse_dot(path.read_text())
    kind = {name: FULL for name in full_sources}  # other sources are scalars and cotangents: SMALL
    total = Traffic()
    for label, inputs, outputs_ in primitives:
        classes, reads, writes = _rule(label, [kind.get(name, SMALL) for name in inputs], len(outputs_))
        kind.update(zip(outputs_, classes))
        total = total + Traffic(reads, writes)
    return total


def _named(result) -> dict:
    value, grads = (result, ()) if isinstance(result, mx.array) else (result[0], result[1])
    grads = (grads,) if isinstance(grads, mx.array) else grads
    return {"loss": value, **{f"grad{i}": g for i, g in enumerate(grads)}}


def reference_traffic(impl: str, case: bc.Case, pass_name: str, args: tuple) -> Traffic:
    outputs = _named(bc.pass_function(impl, case, pass_name)(*args))
    return graph_traffic(outputs, {"x": args[0], "t": args[1]})


def fallback_traffic(case: bc.Case, pass_name: str, args: tuple) -> Traffic:
    from kl_metal import config

    with _environment(config.BACKEND.name, "fallback"):
        return reference_traffic("kl_metal", case, pass_name, args)


class _environment:
    def __init__(self, name, value):
        self.name, self.value = name, value

    def __enter__(self):
        import os

        self.previous = os.environ.get(self.name)
        os.environ[self.name] = self.value

    def __exit__(self, *exc):
        import os

        if self.previous is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.previous


# ----------------------------------------------------------------------------- kernels, via the emulator


def kernel_traffic(case: bc.Case, pass_name: str, args: tuple) -> list:
    """[(kernel name, full-size Traffic, row-sized reads)] per launch, per element of `inputs`."""
    from metal_emulator import emulated_metal

    elements = args[0].size
    with emulated_metal(bounds=False, traffic=True, coverage=False) as emulator:
        mx.eval(bc.pass_function("kl_metal", case, pass_name)(*args))
        launches = list(emulator.launches)
    result = []
    for record in launches:
        full, row_reads = Traffic(), 0.0
        for buffer in record.buffers.values():
            if buffer.kind == "aux" or buffer.size == 1:  # MLX's shape arguments; scalar launch constants
                continue
            if buffer.size >= elements:
                full = full + Traffic(buffer.elements_read / elements, buffer.elements_written / elements)
            else:
                row_reads += buffer.elements_read / elements
        result.append((record.name, full, row_reads))
    return result


# ----------------------------------------------------------------------------- the table


def rows() -> list:
    table = []
    for label, case in CASES:
        args = bc.arrays(case)
        for pass_name in bc.PASSES:
            launches = kernel_traffic(case, pass_name, args)
            total = sum((t for _, t, _ in launches), Traffic())
            table.append({
                "case": label, "pass": pass_name,
                "kernels": "<br>".join(f"`{name}` {t}" for name, t, _ in launches),
                "row_reads": sum(r for *_, r in launches),
                "kl_metal": total,
                "fallback": fallback_traffic(case, pass_name, args),
                "reference": reference_traffic("reference", case, pass_name, args),
                "compiled": reference_traffic("reference_compiled", case, pass_name, args),
                "minimum": minimum(case, pass_name, split=False),
                "split_minimum": minimum(case, pass_name, split=True),
            })
    return table


def markdown(table: list) -> str:
    lines = [
        "| case (forward variant) | pass | kl_metal kernels, reads / writes | kl_metal total | row-sized reads "
        "(g, w) | kl_metal fallback | reference | mx.compile(reference) | minimum, one pass "
        "| minimum, forward then backward |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table:
        lines.append(
            f"| {row['case']} | {row['pass']} | {row['kernels']} | {row['kl_metal']} | {_number(row['row_reads'])} "
            f"| {row['fallback']} | {row['reference']} | {row['compiled']} "
            f"| {row['minimum']} | {row['split_minimum']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    print("Elements of full-size arrays read / written per element of `inputs` (benchmarks/traffic.py).\n")
    print(markdown(rows()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
