"""The fused kernels (kl_metal.metal backend functions) against the float64 oracle in tests/_oracle.py.

Every forward variant (small, block, looped, strided) x dtype pairs x axis lengths x layouts, masks and
-inf/NaN patterns; the elementwise backward kernels; launch-grid env configurations; reproducibility.
Runs on the GPU where MLX has Metal, else through the Metal-on-CPU emulator (tests/metal_emulator).

Cost control (the emulator compiles each specialization, ~1 s): the full D list runs for the last-axis
forward with all four dtype pairs; other axes of the matrix use fewer D values, chosen so that each
variant boundary (32, 128/129, 4096/4097, > 32k) is still crossed.
"""
from __future__ import annotations

import contextlib
import math

import mlx.core as mx
import numpy as np
import pytest

import _oracle as oracle
from kl_metal import metal

ON_METAL = mx.metal.is_available()

DTYPES = {
    "f32": (mx.float32, mx.float32),
    "f16": (mx.float16, mx.float16),
    "bf16": (mx.bfloat16, mx.bfloat16),
    "bf16-f32": (mx.bfloat16, mx.float32),  # bf16 student, f32 teacher
}
D_ALL = [1, 3, 31, 32, 33, 257, 1024, 4095, 4096, 4097, 32000, 151936]
ENV_NAMES = [var.name for var in metal.SETTINGS]


@contextlib.contextmanager
def fused_kernels(**modes):
    """Build kernels for the real GPU (where MLX has Metal; yields None) or for the emulator (yields its
    EmulatedMetal, whose `.launches` are the launches evaluated meanwhile)."""
    if ON_METAL:
        assert not modes, "emulator modes exist only in the emulator"
        previous = metal.set_kernel_factory(None)
        try:
            yield None
        finally:
            metal.set_kernel_factory(previous)
    else:
        from metal_emulator import emulated_metal

        with emulated_metal(**modes) as emulator:
            yield emulator


@pytest.fixture
def fused():
    with fused_kernels() as emulator:
        yield emulator


@pytest.fixture
def clean_env(monkeypatch):
    """Default launch settings whatever the caller's environment holds."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def rows_for(d: int) -> int:
    """Enough rows to fill several small-variant threadgroups with a partial last one; few at big D."""
    if d <= 128:
        return 37
    if d <= 4097:
        return 5
    return 3 if d <= 32000 else 2


def chain_length(launch: metal.LaunchPlan, d: int) -> int:
    """Longest chain of float32 additions a term takes under `launch` (for the summation error bound).

    A thread adds at most ceil(D / threads sharing the row) + N_READS terms in sequence; combining the
    threads' partial sums (shuffles, simd_sum, threadgroup slots, column sums) adds at most 32 levels.
    """
    template = dict(launch.template)
    if launch.variant == "small":
        per_row = template["THREADS_PER_ROW"]
    elif launch.variant == "strided":
        per_row = launch.threadgroup[1]
    else:
        per_row = launch.threadgroup[0]
    return math.ceil(d / per_row) + template["N_READS"] + 32


def make_inputs(shape, dtypes, seed, *, weighted=False, mask_nan=True):
    """x, t (rounded to their dtypes) and optional float32 row weights with zeros; rows with weight 0
    hold NaN in x and t, which must never be read."""
    rng = np.random.default_rng(seed)
    x = oracle.log_probabilities(rng, shape)
    t = oracle.log_probabilities(rng, shape)
    w = None
    if weighted:
        outer, _, inner = shape
        w = rng.uniform(0.25, 2.0, (outer, inner)).astype(np.float32)
        w[rng.random((outer, inner)) < 0.3] = 0.0
        w.flat[0] = 0.0
        if mask_nan:
            masked = np.broadcast_to((w == 0)[:, None, :], shape)
            x[masked] = np.nan
            t[masked] = np.nan
        w = mx.array(w)
    return oracle.as_mx(x, dtypes[0]), oracle.as_mx(t, dtypes[1]), w


def check_forward(x, t, w, what=""):
    launch = metal.plan(x.shape, x.dtype, t.dtype, w is not None)
    loss, saved = metal.row_loss(x, t, w)
    assert saved == ()
    assert loss.dtype == mx.float32 and loss.shape == (x.shape[0], x.shape[2])
    ref, magnitude = oracle.row_loss(x, t, w)
    oracle.assert_rows_close(loss, ref, magnitude, chain_length(launch, x.shape[1]),
                             f"{what} {launch.describe()}")
    return loss, launch


# ------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("d", D_ALL)
@pytest.mark.parametrize("pair", list(DTYPES))
def test_forward_last_axis(fused, clean_env, d, pair):
    weighted = (D_ALL.index(d) + list(DTYPES).index(pair)) % 2 == 1
    shape = (rows_for(d), d, 1)
    x, t, w = make_inputs(shape, DTYPES[pair], seed=d, weighted=weighted)
    _, launch = check_forward(x, t, w, f"D={d} {pair} weighted={weighted}")
    expected = "small" if d <= 128 else "block" if d <= 4096 else "looped"
    assert launch.variant == expected


@pytest.mark.parametrize("d, pair, inner", [
    (1, "f32", 3), (3, "bf16-f32", 5), (31, "f32", 40), (33, "f16", 3), (33, "bf16", 33),
    (257, "f32", 2), (257, "bf16-f32", 40), (1024, "f16", 3), (4097, "f32", 3),
    (4097, "bf16-f32", 33), (32000, "bf16", 2),
])
def test_forward_middle_axis(fused, clean_env, d, pair, inner):
    """Reduction over a strided axis: (outer, D, inner) with inner > 1, no transpose copy."""
    weighted = inner % 2 == 1
    outer = 3 if d <= 4097 else 1
    x, t, w = make_inputs((outer, d, inner), DTYPES[pair], seed=d * inner, weighted=weighted)
    _, launch = check_forward(x, t, w, f"D={d} inner={inner} {pair}")
    assert launch.variant == "strided"


@pytest.mark.parametrize("d, inner", [(33, 1), (4097, 1), (257, 3)])
@pytest.mark.parametrize("operand", ["inputs", "targets"])
def test_forward_broadcast_operand(fused, clean_env, d, inner, operand):
    """One operand broadcast over outer (a stride-0 view, as after losses.py broadcasts a teacher row)."""
    outer = 4
    x, t, _ = make_inputs((outer, d, inner), DTYPES["bf16-f32"], seed=7)
    if operand == "inputs":
        x = mx.broadcast_to(x[:1], x.shape)
    else:
        t = mx.broadcast_to(t[:1], t.shape)
    check_forward(x, t, None, f"broadcast {operand}")


SPECIAL_SHAPES = {"small": (12, 33, 1), "block": (12, 257, 1), "looped": (12, 4097, 1),
                  "strided": (12, 33, 3)}


def special_inputs(shape, dtypes, seed=0):
    """Rows exercising each convention: see the comments on each row."""
    rng = np.random.default_rng(seed)
    x = oracle.log_probabilities(rng, shape)
    t = oracle.log_probabilities(rng, shape)
    d = shape[1]
    t[0] = -np.inf                                     # all zero-probability targets: exactly 0
    t[1] = -np.inf; t[1, d - 1] = -0.5                 # a single term, at the last position
    t[2] = -np.inf; t[2, 0] = -0.25                    # a single term, at the first position
    t[3, 1::2] = -np.inf; x[3, 3] = np.nan             # NaN input where t == -inf: NaN
    t[3, 3] = -np.inf
    x[4, d // 2] = -np.inf                             # x == -inf with finite t: +inf
    t[5, d - 2] = np.nan                               # NaN target: NaN
    x[6, 1] = np.nan                                   # NaN input with finite t: NaN
    t[7, 2] = -np.inf; x[7, 2] = -np.inf               # both -inf: the term is 0, row finite
    x[8, 0] = -np.inf; t[8, 0] = -np.inf; x[8, 1] = -np.inf  # +inf despite a 0 term before it
    t[9] = 3.0; x[9] = 3.0                             # exact zero terms, exp(t) > 1
    return oracle.as_mx(x, dtypes[0]), oracle.as_mx(t, dtypes[1])


@pytest.mark.parametrize("variant", list(SPECIAL_SHAPES))
@pytest.mark.parametrize("pair", ["f32", "bf16-f32"])
def test_forward_special_values(fused, clean_env, variant, pair):
    shape = SPECIAL_SHAPES[variant]
    x, t = special_inputs(shape, DTYPES[pair])
    loss, launch = check_forward(x, t, None, f"specials {variant}")
    assert launch.variant == variant
    loss = np.array(loss)
    assert np.all(loss[0] == 0) and np.all(np.isnan(loss[3])) and np.all(loss[4] == np.inf)
    assert np.all(np.isnan(loss[5])) and np.all(np.isnan(loss[6])) and np.all(np.isfinite(loss[7]))
    assert np.all(loss[8] == np.inf) and np.all(loss[9] == 0)
    # Masked rows holding NaN and -inf give exactly 0: they are not read.
    w = np.ones((shape[0], shape[2]), np.float32)
    w[[3, 4, 5, 6, 8]] = 0.0
    w[1] = 0.5
    check_forward(x, t, mx.array(w), f"masked specials {variant}")


def test_forward_empty_and_degenerate(fused, clean_env):
    x, t, _ = make_inputs((0, 5, 1), DTYPES["f32"], seed=1)
    loss, _ = metal.row_loss(x, t, None)
    assert loss.shape == (0, 1)
    x = mx.zeros((3, 0, 2))
    loss, _ = metal.row_loss(x, x, None)
    assert loss.shape == (3, 2) and np.all(np.array(loss) == 0)


def test_forward_small_inputs_use_constant_buffers(fused, clean_env):
    """Fewer than 8 elements: MLX passes those buffers in the constant address space."""
    x, t, _ = make_inputs((2, 3, 1), DTYPES["f32"], seed=3)
    check_forward(x, t, mx.array([[1.5], [0.0]]), "tiny")
    x, t, _ = make_inputs((1, 3, 2), DTYPES["f16"], seed=4)
    check_forward(x, t, None, "tiny strided")


# ------------------------------------------------------------------------------------ backward

BACKWARD_CASES = [
    # (D, dtype pair, inner)
    *[(d, pair, 1) for d in (1, 33, 4097, 151936) for pair in DTYPES],
    (3, "f32", 1), (257, "f32", 1), (4096, "f32", 1),
    (3, "f32", 5), (3, "bf16-f32", 40), (257, "f32", 3), (257, "bf16-f32", 6),
]


def backward_inputs(shape, dtypes, seed):
    """x, t, g with zero-cotangent rows (NaN data there: never read), t == -inf and NaN entries."""
    rng = np.random.default_rng(seed)
    outer, d, inner = shape
    x = oracle.log_probabilities(rng, shape)
    t = oracle.log_probabilities(rng, shape)
    g = rng.standard_normal((outer, inner)).astype(np.float32)
    g[rng.random((outer, inner)) < 0.25] = 0.0
    g.flat[-1] = 0.0
    zero_rows = np.broadcast_to((g == 0)[:, None, :], shape)
    x[zero_rows] = np.nan
    t[zero_rows] = np.nan
    live = ~zero_rows
    special = live & (rng.random(shape) < 0.05)
    t[special] = -np.inf                      # exactly 0 in both gradients
    x[special & (rng.random(shape) < 0.5)] = np.nan
    x[live & (rng.random(shape) < 0.02)] = np.nan  # dt NaN (dx unaffected: it never reads x)
    return oracle.as_mx(x, dtypes[0]), oracle.as_mx(t, dtypes[1]), mx.array(g)


@pytest.mark.parametrize("d, pair, inner", BACKWARD_CASES)
def test_backward(fused, clean_env, d, pair, inner):
    outer = rows_for(d) if inner == 1 else 3
    x, t, g = backward_inputs((outer, d, inner), DTYPES[pair], seed=d + inner)
    dx = metal.grad_inputs(t, g, (), x.dtype)
    assert dx.shape == t.shape and dx.dtype == x.dtype
    ref, scale = oracle.grad_inputs(t, g)
    oracle.assert_grads_close(dx, ref, scale, f"dx D={d} {pair} inner={inner}")
    dt = metal.grad_targets(x, t, g, ())
    assert dt.shape == t.shape and dt.dtype == t.dtype
    ref, scale = oracle.grad_targets(x, t, g)
    oracle.assert_grads_close(dt, ref, scale, f"dt D={d} {pair} inner={inner}")


def test_backward_zero_is_positive_zero(fused, clean_env):
    """The demanded zeros are +0.0 (bit for bit as the fallback's where(..., 0.0, ...))."""
    x, t, g = backward_inputs((5, 33, 1), DTYPES["f32"], seed=2)
    for grad in (metal.grad_inputs(t, g, (), mx.float32), metal.grad_targets(x, t, g, ())):
        zero = np.array((t == -mx.inf) | (mx.expand_dims(g, 1) == 0))
        bits = np.array(grad).view(np.uint32)
        assert np.all(bits[zero] == 0)


# ------------------------------------------------------------------------------------ reproducibility


@pytest.mark.parametrize("shape", [(37, 33, 1), (5, 4097, 1), (3, 257, 5)])
def test_bitwise_identical_across_runs(fused, clean_env, shape):
    x, t, w = make_inputs(shape, DTYPES["bf16-f32"], seed=11, weighted=True)
    g = mx.array(np.random.default_rng(1).standard_normal((shape[0], shape[2])).astype(np.float32))
    runs = []
    for _ in range(2):
        loss, _ = metal.row_loss(x, t, w)
        dx = metal.grad_inputs(t, g, (), x.dtype)
        dt = metal.grad_targets(x, t, g, ())
        mx.eval(loss, dx, dt)
        runs.append([np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).tobytes()
                     for a in (loss, dx, dt)])
    assert runs[0] == runs[1]


def test_concurrent_threads(fused, clean_env):
    """Kernel objects are built once and shared: several Python threads launching at once agree with
    a single-threaded run bit for bit."""
    import threading

    shapes = [(37, 33, 1), (3, 257, 1), (2, 4097, 1), (3, 31, 5)]
    cases = [make_inputs(shape, DTYPES["f32"], seed=50 + i) for i, shape in enumerate(shapes)]
    expected = [np.array(metal.row_loss(x, t, None)[0]) for x, t, _ in cases]
    metal.set_kernel_factory(metal.set_kernel_factory(None))  # empty the kernel cache
    results, errors = {}, []

    def work(i):
        try:
            x, t, _ = cases[i % len(cases)]
            loss, _ = metal.row_loss(x, t, None)
            results[i] = np.array(loss)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i, got in results.items():
        assert np.array_equal(got, expected[i % len(cases)], equal_nan=True)


# ------------------------------------------------------------------------------------ env configurations

ENV_CONFIGS = [
    {"KL_METAL_THREADGROUP_SIZE": "100", "KL_METAL_N_READS": "3"},
    {"KL_METAL_THREADGROUP_SIZE": "33", "KL_METAL_N_READS": "1"},
    {"KL_METAL_THREADGROUP_SIZE": "1"},
    {"KL_METAL_SMALL_MAX_D": "0", "KL_METAL_BLOCK_MAX_D": "0"},  # everything looped
    {"KL_METAL_SMALL_MAX_D": "4096", "KL_METAL_SMALL_ROWS_PER_THREADGROUP": "3"},  # small up to 4096
    {"KL_METAL_N_READS": "16", "KL_METAL_BLOCK_MAX_D": "100000"},  # block at 4097: 288 threads
    {"KL_METAL_SMALL_ROWS_PER_THREADGROUP": "5", "KL_METAL_N_READS": "2"},
]
ENV_SHAPES = [(7, 3, 1), (37, 33, 1), (5, 257, 1), (3, 4097, 1), (3, 257, 5), (2, 31, 40)]


@pytest.mark.parametrize("config", ENV_CONFIGS, ids=lambda c: ",".join(f"{k[9:]}={v}" for k, v in c.items()))
def test_env_configurations_agree(fused, clean_env, config):
    """Any valid setting gives the defaults' results within float32 reassociation (loss) and bit for
    bit (elementwise gradients: no reassociation there)."""
    cases = []
    for i, shape in enumerate(ENV_SHAPES):
        x, t, w = make_inputs(shape, DTYPES["f32"], seed=100 + i, weighted=i % 2 == 0)
        g = mx.array(np.random.default_rng(i).standard_normal((shape[0], shape[2])).astype(np.float32))
        default_plan = metal.plan(shape, x.dtype, t.dtype, w is not None)
        loss, _ = metal.row_loss(x, t, w)
        dx = metal.grad_inputs(t, g, (), x.dtype)
        cases.append((x, t, w, g, default_plan, np.array(loss), np.array(dx)))
    for name, value in config.items():
        clean_env.setenv(name, value)
    for x, t, w, g, default_plan, default_loss, default_dx in cases:
        launch = metal.plan(x.shape, x.dtype, t.dtype, w is not None)
        for name, value in config.items():
            assert launch.settings[name] == int(value)
        loss, _ = check_forward(x, t, w, f"env {config}")
        d = x.shape[1]
        magnitude = oracle.row_loss(x, t, w)[1]
        tol = (chain_length(launch, d) + chain_length(default_plan, d)) * oracle.EPS32 * magnitude
        assert np.all(np.abs(np.array(loss) - default_loss) <= tol + 1e-30), launch.describe()
        dx = metal.grad_inputs(t, g, (), x.dtype)
        assert np.array_equal(np.array(dx), default_dx, equal_nan=True), launch.describe()


@pytest.mark.parametrize("threads", [1, 31, 33, 100, 1000])
def test_threadgroup_sizes_not_multiple_of_32(fused, clean_env, threads):
    """Partial simdgroups in every kernel: forward row/strided kernels and both gradients."""
    clean_env.setenv("KL_METAL_THREADGROUP_SIZE", str(threads))
    for i, shape in enumerate([(3, 4097, 1), (37, 33, 1), (2, 300, 7)]):
        x, t, w = make_inputs(shape, DTYPES["bf16-f32"], seed=threads + i, weighted=True)
        check_forward(x, t, w, f"threads={threads}")
        g = mx.array(np.random.default_rng(i).standard_normal((shape[0], shape[2])).astype(np.float32))
        ref, scale = oracle.grad_targets(x, t, g)
        oracle.assert_grads_close(metal.grad_targets(x, t, g, ()), ref, scale, f"dt threads={threads}")


# ------------------------------------------------------------------------------------ settings, plans


@pytest.mark.parametrize("name, value", [
    ("KL_METAL_THREADGROUP_SIZE", "0"), ("KL_METAL_THREADGROUP_SIZE", "1025"),
    ("KL_METAL_THREADGROUP_SIZE", "abc"), ("KL_METAL_N_READS", "17"), ("KL_METAL_N_READS", "2.5"),
    ("KL_METAL_SMALL_ROWS_PER_THREADGROUP", "0"), ("KL_METAL_SMALL_MAX_D", "-1"),
    ("KL_METAL_SMALL_MAX_D", "4097"), ("KL_METAL_BLOCK_MAX_D", "1e9"),
])
def test_invalid_settings_raise(clean_env, name, value):
    clean_env.setenv(name, value)
    with pytest.raises(ValueError) as info:
        metal.plan((4, 64, 1), mx.float32, mx.float32, False)
    message = str(info.value)
    assert name in message and repr(value) in message and "[" in message  # the range


def test_settings_are_registered():
    from kl_metal import config

    names = {var.name for var in config.ALL}
    assert set(ENV_NAMES) <= names


@pytest.mark.parametrize("shape, variant, grid, threadgroup", [
    ((37, 1, 1), "small", (1, 37, 1), (1, 37, 1)),
    ((1000, 33, 1), "small", (16, 1000, 1), (16, 16, 1)),
    ((8, 128, 1), "small", (32, 8, 1), (32, 8, 1)),
    ((8, 129, 1), "block", (64, 8, 1), (64, 1, 1)),
    ((8, 4096, 1), "block", (1024, 8, 1), (1024, 1, 1)),
    ((8, 4097, 1), "looped", (1024, 8, 1), (1024, 1, 1)),
    ((8, 151936, 1), "looped", (1024, 8, 1), (1024, 1, 1)),
    ((8, 100, 3), "strided", (3, 85, 8), (3, 85, 1)),
    ((8, 4096, 100), "strided", (100, 8, 8), (32, 8, 1)),
])
def test_plan_variants(clean_env, shape, variant, grid, threadgroup):
    launch = metal.plan(shape, mx.bfloat16, mx.float32, False)
    assert (launch.variant, launch.grid, launch.threadgroup) == (variant, grid, threadgroup)
    line = launch.describe()
    assert variant in line and str(grid) in line and "KL_METAL_N_READS=4" in line and "\n" not in line


def test_plan_backward(clean_env):
    launch = metal.plan((8, 4097, 1), mx.bfloat16, mx.float32, False, op="grad_inputs")
    assert launch.kernel == "kl_grad_inputs" and launch.grid == (1025, 8, 1)
    assert launch.threadgroup == (256, 1, 1) and dict(launch.template)["OUT"] == mx.bfloat16
    launch = metal.plan((8, 100, 6), mx.bfloat16, mx.float32, False, op="grad_targets")
    assert launch.grid == (6, 25, 8) and launch.threadgroup == (6, 25, 1)
    assert dict(launch.template)["OUT"] == mx.float32 and dict(launch.template)["STRIDED"]
