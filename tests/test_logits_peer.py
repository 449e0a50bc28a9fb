"""kl_div_from_logits beside its peer, mlx-lm's fused KL (`mlx_lm.tuner.losses.kl_div_loss`), both run as
Metal kernels under the emulator: values where mlx-lm is correct, and memory traffic per pass.

mlx-lm comes from PyPI (the `peer` extra). Only its `tuner/losses.py` is loaded, exactly as shipped, with
its one import from mlx-lm (`from ..utils import can_run_metal`, whose module pulls in transformers)
answered by a stub saying Metal is present, and `mx.fast.metal_kernel` pointed at the emulator while the
module builds its kernels at import. Its own `custom_function` (`_kl_div_loss` and its vjp) then launches
them with its own grid, threadgroup and template: nothing of mlx-lm is re-implemented here.

mlx-lm's arguments are (student logits, teacher logits) at temperature 1, as ours with temperature=1.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from unittest import mock

import mlx.core as mx
import numpy as np
import pytest

from kl_metal import logits
from _oracle import as_mx
from test_logits_oracle import INF, Reference, assert_loss_close, random_logits

pytestmark = pytest.mark.skipif(mx.metal.is_available(), reason="compares kernels under the emulator")
metal_emulator = pytest.importorskip("metal_emulator")


def load_mlx_lm_losses(metal_kernel):
    """mlx_lm/tuner/losses.py as installed (the test extra brings mlx-lm), its kernels built by `metal_kernel`."""
    spec = importlib.util.find_spec("mlx_lm")  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations, "mlx-lm is not installed: pip install '.[test]'"
    package = Path(list(spec.submodule_search_locations)[0])
    stubs = {name: types.ModuleType(name) for name in ("mlx_lm", "mlx_lm.tuner", "mlx_lm.utils")}
    stubs["mlx_lm"].__path__ = [str(package)]
    stubs["mlx_lm.tuner"].__path__ = [str(package / "tuner")]
    stubs["mlx_lm.utils"].can_run_metal = lambda: True
    with mock.patch.dict(sys.modules, stubs), mock.patch.object(mx.fast, "metal_kernel", metal_kernel):
        module_spec = importlib.util.spec_from_file_location("mlx_lm.tuner.losses", package / "tuner" / "losses.py")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def peer():
    return load_mlx_lm_losses(metal_emulator.metal_kernel)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("KL_METAL_THREADGROUP_SIZE", "KL_METAL_N_READS", "KL_METAL_BACKEND"):
        monkeypatch.delenv(name, raising=False)


def reads(records, name: str, buffer: str) -> float:
    """Elements of `buffer` read by the launches of kernel `name`, counting repeats."""
    return sum(record[buffer].elements_read for record in records if record.name == name)


@pytest.mark.parametrize("length", [4096, 4097, 151936])
def test_traffic_half_of_mlx_lm(peer, clean_env, length):
    """Forward and student backward: ours read each logit once per pass, mlx-lm's twice."""
    rng = np.random.default_rng(length)
    rows = 2
    s = mx.array(random_logits(rng, (rows, length)))
    t = mx.array(random_logits(rng, (rows, length)))
    g = mx.ones((rows,))
    with metal_emulator.emulated_metal() as em:
        (loss,), (ds, _) = mx.vjp(lambda a, b: logits.kl_div_from_logits(a, mx.stop_gradient(b)), [s, t], [g])
        mx.eval(loss, ds)
        ours = em.launches
    with metal_emulator.LaunchRecorder() as recorder:
        (loss_peer,), (ds_peer, _) = mx.vjp(peer._kl_div_loss, [s, t], [g])
        mx.eval(loss_peer, ds_peer)  # its vjp does not use the forward's output: evaluate both
        theirs = recorder.launches
    size = rows * length
    our_forward = reads(ours, "kl_logits_forward", "student") + reads(ours, "kl_logits_forward", "teacher")
    our_backward = (reads(ours, "kl_logits_grad_student", "student")
                    + reads(ours, "kl_logits_grad_student", "teacher"))
    their_forward = reads(theirs, "kl_forward", "logits_q") + reads(theirs, "kl_forward", "logits_p")
    their_backward = reads(theirs, "kl_backward", "logits_q") + reads(theirs, "kl_backward", "logits_p")
    print(f"\nD={length} rows={rows}: element reads per pass (student + teacher): "
          f"forward ours {our_forward:.0f} mlx-lm {their_forward:.0f}; "
          f"backward ours {our_backward:.0f} mlx-lm {their_backward:.0f}")
    assert our_forward == 2 * size and our_backward == 2 * size
    assert their_forward == 2 * our_forward and their_backward == 2 * our_backward
    # Writes: one gradient element per logit for both; the forward writes per-row values only.
    assert sum(r["ds"].elements_written for r in ours if r.name == "kl_logits_grad_student") == size
    assert sum(r["out"].elements_written for r in theirs if r.name == "kl_backward") == size


def test_emulator_does_not_compile_mlx_lm_in_bfloat16(peer, clean_env):
    """mlx-lm's `cond ? logits[i] : -1e30` mixes a bfloat element with a float literal, which Metal
    accepts; the emulator's C++ bfloat16 (a struct converting both ways) makes the conditional ambiguous,
    so the peer comparison runs in float32 only (tests/metal_emulator/README.md). If the emulator learns
    it, this fails: then add bfloat16 to the comparison below."""
    s = mx.zeros((2, 4097), mx.bfloat16)
    with pytest.raises(metal_emulator.EmulatorCompileError):
        mx.eval(peer._kl_div_loss(s, s))


@pytest.mark.parametrize("length", [4097, 32000])
@pytest.mark.parametrize("dtype", [mx.float32], ids=["f32"])
def test_agree_with_mlx_lm_where_it_is_correct(peer, clean_env, length, dtype):
    """Finite logits: both within the float64 oracle's float32 bound (mlx-lm rounds to the input
    dtype, so its loss gets one extra rounding of that dtype), and the student gradients agree."""
    rng = np.random.default_rng(length + 7)
    rows = 3
    s = as_mx(random_logits(rng, (rows, length)), dtype)
    t = as_mx(random_logits(rng, (rows, length), offset=1.0), dtype)
    g = mx.array([1.0, 0.5, 2.0], dtype)
    with metal_emulator.emulated_metal():
        (ours,), (ds, _) = mx.vjp(lambda a, b: logits.kl_div_from_logits(a, mx.stop_gradient(b)), [s, t], [g])
        mx.eval(ours, ds)
    (theirs,), (ds_peer, dt_peer) = mx.vjp(peer._kl_div_loss, [s, t], [g])
    ref = Reference(s, t)
    # The chain of mlx-lm's sums: ceil(D / 1024) per thread + 64 levels; ours is shorter or equal.
    tol = ref.loss_tolerance(-(-length // 1024) + 4 + 64)
    rounding = {mx.float32: 2.0**-24, mx.bfloat16: 2.0**-8}[dtype]
    tol = tol + rounding * (np.abs(ref.kl) + tol)
    assert_loss_close(ours, ref.kl, tol, "kl_metal")
    assert_loss_close(theirs, ref.kl, tol, "mlx-lm")
    want = ref.grad_student(np.array(g.astype(mx.float32)))
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.array(ds.astype(mx.float32)), want, atol=4 * rounding * scale + 1e-7)
    np.testing.assert_allclose(np.array(ds_peer.astype(mx.float32)), np.array(ds.astype(mx.float32)),
                               atol=4 * rounding * scale + 1e-7)
    # mlx-lm gives the teacher no gradient (zeros); ours is p * (log p - log q - kl) * g.
    np.testing.assert_array_equal(np.array(dt_peer.astype(mx.float32)), 0.0)


def test_where_mlx_lm_differs(peer, clean_env):
    """Masked vocabulary entries (-inf in both rows): mlx-lm computes 0 * (-inf - -inf) = NaN, ours 0."""
    rng = np.random.default_rng(3)
    s_np, t_np = random_logits(rng, (2, 4097)), random_logits(rng, (2, 4097))
    s_np[:, 10:20] = t_np[:, 10:20] = -INF
    s, t = mx.array(s_np), mx.array(t_np)
    with metal_emulator.emulated_metal():
        ours = logits.kl_div_from_logits(s, t)
        mx.eval(ours)
    theirs = peer._kl_div_loss(s, t)
    ref = Reference(s_np, t_np)
    assert np.isfinite(np.array(ours)).all()
    np.testing.assert_allclose(np.array(ours), ref.kl, rtol=1e-5)
    assert np.isnan(np.array(theirs)).all()


def test_race_checker_flags_mlx_lm_forward_but_not_ours(clean_env):
    """mlx-lm 0.32.2's forward reuses `shared` for the sums while other simdgroups may still read the
    maxima from it (no barrier between): a threadgroup-memory race. Ours keeps separate slots."""
    import functools

    racy = load_mlx_lm_losses(functools.partial(metal_emulator.metal_kernel, race=True))
    rng = np.random.default_rng(5)
    s, t = mx.array(random_logits(rng, (1, 8193))), mx.array(random_logits(rng, (1, 8193)))
    with pytest.raises(RuntimeError, match="race"):
        mx.eval(racy._kl_div_loss(s, t))
    with metal_emulator.emulated_metal(race=True):
        mx.eval(logits.kl_div_from_logits(s, t))
