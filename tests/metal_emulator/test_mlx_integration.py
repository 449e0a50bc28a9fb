"""Integration with MLX: source fidelity, lazy graph nodes (compile/grad/custom_function) and kl_metal's seam."""

import os
import sys
import tempfile

import mlx.core as mx
import numpy as np
import pytest

from ._testutil import me

SCALE_SRC = """
  uint i = thread_position_in_grid.x;
  if (i >= uint(inp_shape[0]) * uint(inp_shape[1])) return;
  T v = inp[i];
  out[i] = static_cast<T>(flag ? v * scale + bias[i % N] : v);
"""


def _mlx_verbose_export(kernel_kwargs, call_kwargs, example_inputs) -> str:
    """What MLX itself prints for the kernel (fd-level capture), independently of the emulator's code."""
    k = mx.fast.metal_kernel(**kernel_kwargs)

    def fn(*args):
        return k(inputs=list(args), verbose=True, **call_kwargs)

    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryFile() as cap:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(cap.fileno(), 1)
        try:
            mx.export_function(os.path.join(d, "f.mlxfn"), fn, *example_inputs)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        cap.seek(0)
        text = cap.read().decode()
    return text.split("```\n", 1)[1].rsplit("\n```", 1)[0]


def test_generated_source_is_mlx_own_output():
    kw = dict(name="scale_bias", input_names=["inp", "scale", "bias"], output_names=["out"], source=SCALE_SRC,
              header="// header line\n")
    call = dict(template=[("T", mx.float32), ("N", 3), ("flag", True)], grid=(8, 1, 1), threadgroup=(8, 1, 1),
                output_shapes=[(2, 4)], output_dtypes=[mx.float32])
    x, bias = mx.arange(8, dtype=mx.float32).reshape(2, 4), mx.array([1.0, 2.0, 3.0])
    expected = _mlx_verbose_export(kw, call, [x, mx.array(2.0), bias])
    k = me.metal_kernel(**kw)
    got = me.generated_source(k, inputs=[x, 2.0, bias], output_dtypes=[mx.float32], template=call["template"])
    assert got == expected
    assert "const constant float& scale [[buffer(2)]]" in got and "const constant float* bias" in got
    # ... and the emulator runs exactly that text
    (o,) = k(inputs=[x, 2.0, bias], **call)
    ref = np.arange(8, dtype=np.float32) * 2 + np.array([1, 2, 3], np.float32)[np.arange(8) % 3]
    np.testing.assert_array_equal(np.array(o).ravel(), ref)
    (o,) = k(inputs=[x, 2.0, bias], **dict(call, template=[("T", mx.float32), ("N", 3), ("flag", False)]))
    np.testing.assert_array_equal(np.array(o).ravel(), np.arange(8))


def test_strides_ndim_and_non_contiguous_inputs():
    src = """
      uint i = thread_position_in_grid.x;
      int64_t loc = elem_to_loc(int64_t(i), inp_shape, inp_strides, inp_ndim);
      out[i] = inp[loc];
    """
    base = mx.arange(24, dtype=mx.float32).reshape(2, 3, 4)
    xt = mx.transpose(base, (2, 0, 1))  # not row contiguous
    ref = np.array(xt).ravel()
    for erc in (True, False):
        k = me.metal_kernel("strided_copy", ["inp"], ["out"], src, ensure_row_contiguous=erc)
        (o,) = k(inputs=[xt], grid=(24, 1, 1), threadgroup=(8, 1, 1), output_shapes=[(24,)],
                 output_dtypes=[mx.float32])
        np.testing.assert_array_equal(np.array(o), ref)


COPY2 = me.metal_kernel("times_two", ["x"], ["y"], "uint i = thread_position_in_grid.x; y[i] = 2 * x[i];")


def _times_two(x):
    return COPY2(inputs=[x], grid=(x.size, 1, 1), threadgroup=(64, 1, 1), output_shapes=[x.shape],
                 output_dtypes=[x.dtype])[0]


def test_lazy_node_under_compile_and_errors_surface_at_eval():
    x = mx.arange(100, dtype=mx.float32)
    f = mx.compile(lambda a: _times_two(a) + 1)
    np.testing.assert_array_equal(np.array(f(x)), np.arange(100) * 2 + 1)
    np.testing.assert_array_equal(np.array(f(x + 1)), (np.arange(100) + 1) * 2 + 1)
    bad = me.metal_kernel("oob_lazy", ["x"], ["y"], "y[0] = x[1000];")
    y = bad(inputs=[x], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)], output_dtypes=[mx.float32])[0]
    with pytest.raises(RuntimeError, match="oob_lazy"):  # building the node did not raise; eval does
        mx.eval(y)


def test_compile_does_not_merge_distinct_launches():
    k = me.metal_kernel("grid_size", ["x"], ["y"], "y[thread_position_in_grid.x] = threads_per_grid.x;")

    def fn(x):
        a = k(inputs=[x], grid=(4, 1, 1), threadgroup=(4, 1, 1), output_shapes=[(8,)], output_dtypes=[mx.float32],
              init_value=0)[0]
        b = k(inputs=[x], grid=(8, 1, 1), threadgroup=(4, 1, 1), output_shapes=[(8,)], output_dtypes=[mx.float32],
              init_value=0)[0]
        return a, b

    a, b = mx.compile(fn)(mx.zeros((8,)))
    np.testing.assert_array_equal(np.array(a), [4, 4, 4, 4, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.array(b), [8] * 8)


def test_grad_through_custom_function_with_emulated_forward_and_vjp():
    @mx.custom_function
    def f(x):
        return _times_two(x) * x  # 2 x^2

    @f.vjp
    def f_vjp(x, cotangent, output):
        return _times_two(_times_two(x)) * cotangent  # 4 x

    x = mx.array(np.linspace(-2, 2, 50, dtype=np.float32))
    g = mx.grad(lambda a: f(a).sum())(x)
    np.testing.assert_allclose(np.array(g), 4 * np.array(x), rtol=0, atol=0)
    gc = mx.compile(mx.grad(lambda a: f(a).sum()))(x)
    np.testing.assert_allclose(np.array(gc), 4 * np.array(x), rtol=0, atol=0)
    v, gv = mx.value_and_grad(lambda a: f(a).sum())(x)
    assert abs(float(v) - float((2 * np.array(x) ** 2).sum())) < 1e-3


def test_emulated_metal_switches_kl_metal_to_metal_and_restores():
    from kl_metal import metal as klm

    before = klm.available(mx.cpu)
    assert before[0] is False
    with me.emulated_metal(race=True) as em:
        ok, why = klm.available(mx.cpu)
        assert ok is True and "factory" in why
        factory = klm.set_kernel_factory(None)  # peek at the installed factory, then put it back
        klm.set_kernel_factory(factory)
        k = factory("seam_probe", ["x"], ["y"], "y[thread_position_in_grid.x] = x[thread_position_in_grid.x] + 1;")
        assert isinstance(k, me.MetalKernel) and k.modes & 2  # race mode passed through
        y = k(inputs=[mx.zeros((8,))], grid=(8, 1, 1), threadgroup=(8, 1, 1), output_shapes=[(8,)],
              output_dtypes=[mx.float32])[0]
        mx.eval(y)
        assert [r.name for r in em.launches] == ["seam_probe"]
        assert em.last("seam_probe")["y"].distinct_written == 8
    assert klm.available(mx.cpu) == before


def test_fixture_installs_the_emulator(emulated_metal):
    from kl_metal import metal as klm

    assert klm.available(mx.cpu)[0] is True
    assert emulated_metal.launches == []
