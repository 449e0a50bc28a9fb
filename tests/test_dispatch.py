"""Dispatch, explain() and KL_METAL_* validation on a machine without Metal (the fused path itself is
tested under the emulator in test_kernels*.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import kl_metal
from kl_metal import config, fallback, metal


@pytest.fixture
def x():
    return mx.zeros((4, 100))


def test_auto_takes_the_fallback_without_metal(monkeypatch, x):
    monkeypatch.delenv("KL_METAL_BACKEND", raising=False)
    decision = kl_metal.explain(x, x)
    assert decision.path == "fallback" and decision.backend is fallback and decision.launch is None
    assert "no Metal" in decision.reason and "path: fallback" in str(decision)
    assert (decision.rows, decision.axis_length, decision.inner) == (4, 100, 1)


def test_explain_describes_a_middle_axis(x):
    decision = kl_metal.explain(mx.zeros((2, 3, 5)), mx.zeros((3, 5)), axis=1)
    assert (decision.rows, decision.axis_length, decision.inner) == (10, 3, 5)


def test_fused_without_a_fused_backend_raises(monkeypatch, x):
    monkeypatch.setenv("KL_METAL_BACKEND", "fused")
    with pytest.raises(RuntimeError, match="KL_METAL_BACKEND=fused.*no Metal"):
        kl_metal.kl_div_loss(x, x)
    with pytest.raises(RuntimeError, match="KL_METAL_BACKEND=fused"):
        kl_metal.explain(x, x)


def test_fallback_setting_is_honoured(monkeypatch, x):
    monkeypatch.setenv("KL_METAL_BACKEND", "FALLBACK")  # case-insensitive
    assert kl_metal.explain(x, x).reason == "KL_METAL_BACKEND=fallback"


@pytest.mark.parametrize("value", ["gpu", "1", "fused,fallback"])
def test_invalid_backend_value_names_variable_value_and_choices(monkeypatch, x, value):
    monkeypatch.setenv("KL_METAL_BACKEND", value)
    with pytest.raises(ValueError) as info:
        kl_metal.kl_div_loss(x, x)
    message = str(info.value)
    assert "KL_METAL_BACKEND" in message and repr(value) in message and "auto | fused | fallback" in message


def test_integer_variables_validate_range_and_form(monkeypatch):
    var = config.integer("KL_METAL_TEST_SIZE", 256, 1, 1024, "test", multiple_of=32)
    for good, parsed in (("64", 64), (" 1024 ", 1024)):
        monkeypatch.setenv(var.name, good)
        assert var.get() == parsed
    monkeypatch.delenv(var.name)
    assert var.get() == 256
    for bad in ("0", "2048", "100", "abc", "64.0", "0x40"):
        monkeypatch.setenv(var.name, bad)
        with pytest.raises(ValueError, match=rf"KL_METAL_TEST_SIZE={bad!r} is invalid.*\[1, 1024\], multiples of 32"):
            var.get()


def test_every_registered_variable_is_documented_in_the_readme():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [var.name for var in config.ALL if var.name not in text]
    assert not missing, f"README.md does not document {missing}"


def test_without_an_injected_factory_cpu_is_not_fused():
    assert metal.available(mx.Device(mx.cpu))[0] is False


def test_axes_beyond_the_kernel_grid_take_the_fallback(monkeypatch):
    # With an injected fused backend, sizes the kernels can't launch still go to the composed ops.
    monkeypatch.delenv("KL_METAL_BACKEND", raising=False)
    previous = metal.set_kernel_factory(lambda **kwargs: None)
    try:
        monkeypatch.setattr(metal, "MAX_GRID", 64)
        decision = kl_metal.explain(mx.zeros((2, 100)), mx.zeros((2, 100)))
        assert decision.path == "fallback" and "exceeds the fused kernels' grid" in decision.reason
        monkeypatch.setenv("KL_METAL_BACKEND", "fused")
        with pytest.raises(RuntimeError, match="exceeds"):
            kl_metal.explain(mx.zeros((2, 100)), mx.zeros((2, 100)))
    finally:
        metal.set_kernel_factory(previous)


def test_explain_reports_how_the_fallback_cuts_the_rows(monkeypatch):
    monkeypatch.delenv("KL_METAL_BACKEND", raising=False)
    monkeypatch.setenv("KL_METAL_CPU_CHUNK", "4000")
    monkeypatch.setenv("KL_METAL_CPU_STREAMS", "3")
    decision = kl_metal.explain(mx.zeros((10, 1000)), mx.zeros((10, 1000)))
    assert decision.chunking.startswith("3 chunks of 4 rows over 3 CPU streams")  # rows 0-3, 4-7, 8-9
    assert "fallback: 3 chunks" in str(decision)
    monkeypatch.setenv("KL_METAL_CPU_CHUNK", "1")  # one row a chunk, but no more than MAX_CHUNKS chunks
    assert kl_metal.explain(mx.zeros((4096, 3)), mx.zeros((4096, 3))).chunking.startswith("256 chunks of 16 rows")
    middle = kl_metal.explain(mx.zeros((4, 5, 3)), mx.zeros((4, 5, 3)), axis=1).chunking
    assert middle.startswith("4 chunks of 1 slices of 5x3 elements"), middle
    monkeypatch.setenv("KL_METAL_CPU_CHUNK", "10000")
    assert kl_metal.explain(mx.zeros((10, 1000)), mx.zeros((10, 1000))).chunking.startswith("one pass")


@pytest.mark.parametrize("name, bad", [("KL_METAL_CPU_CHUNK", "0"), ("KL_METAL_CPU_STREAMS", "65"),
                                       ("KL_METAL_CPU_STREAMS", "two")])
def test_invalid_fallback_settings_are_named(monkeypatch, name, bad):
    monkeypatch.setenv(name, bad)
    with pytest.raises(ValueError, match=rf"{name}={bad!r} is invalid"):
        kl_metal.kl_div_loss(mx.zeros((4, 100)), mx.zeros((4, 100)))


def test_the_backward_cuts_rows_as_its_forward_did(monkeypatch):
    # Settings read by the backward may differ from the forward's (a changed environment): the backward
    # follows the chunks the forward saved exp(t) in, and the gradient is still right.
    monkeypatch.setenv("KL_METAL_BACKEND", "fallback")
    x, t = mx.random.normal((6, 8), key=mx.random.key(1)), mx.random.normal((6, 8), key=mx.random.key(2))
    monkeypatch.setenv("KL_METAL_CPU_CHUNK", "16")  # 2 rows per chunk
    loss, saved = fallback.row_loss(x[..., None], t[..., None], None)
    assert [p.shape[0] for p in saved] == [2, 2, 2]
    monkeypatch.setenv("KL_METAL_CPU_CHUNK", "24")  # 3 rows per chunk, had the backward re-read it
    dx = fallback.grad_inputs(t[..., None], mx.ones((6, 1)), saved, mx.float32)
    np.testing.assert_allclose(np.array(dx)[..., 0], -np.exp(np.array(t, dtype=np.float64)), rtol=1e-6)


def test_the_fallback_runs_from_any_thread(tmp_path):
    # MLX streams belong to the thread that made them: each thread gets CPU streams of its own. Run in a
    # child process: MLX 0.32 may abort at interpreter exit after a worker thread has used it
    # ("terminate called without an active exception"), which is not kl_metal's to fix.
    script = tmp_path / "threads.py"
    script.write_text(
        "import threading, mlx.core as mx, numpy as np, kl_metal\n"
        "x = mx.random.normal((16, 256), key=mx.random.key(0))\n"
        "t = mx.random.normal((16, 256), key=mx.random.key(1))\n"
        "want = float((np.exp(np.array(t, np.float64)) * (np.array(t, np.float64) - np.array(x))).sum())\n"
        "results = []\n"
        "def call():\n"
        "    results.append(kl_metal.kl_div_loss(x, t, reduction='sum').item())\n"
        "call()\n"
        "threads = [threading.Thread(target=call) for _ in range(3)]\n"
        "[th.start() for th in threads]; [th.join() for th in threads]\n"
        "print(len(results), max(abs(r - want) / abs(want) for r in results), flush=True)\n"
    )
    package_root = str(Path(kl_metal.__file__).resolve().parents[1])
    env = {**os.environ, "KL_METAL_BACKEND": "fallback", "KL_METAL_CPU_CHUNK": "1024", "KL_METAL_CPU_STREAMS": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert len(done.stdout.split()) == 2, done.stderr
    count, error = done.stdout.split()
    assert int(count) == 4 and float(error) < 1e-5, done.stderr  # float32 sums of 4096 terms
