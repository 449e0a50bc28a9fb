"""The emulated `metal_kernel` factory, launch records (traffic) and the sparse entry point."""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import sys
import threading
import time
from typing import Sequence

import mlx.core as mx
import numpy as np

from . import _abi, _build, _source, _translate
from ._errors import EmulatorError

MODE_BOUNDS, MODE_RACE, MODE_TRAFFIC, MODE_COVERAGE = 1, 2, 4, 8
DEFAULT_MODES = dict(bounds=True, race=False, traffic=True, coverage=True)
_KIND_IN, _KIND_SHAPE, _KIND_STRIDES, _KIND_NDIM, _KIND_OUT = 0, 1, 2, 3, 4


def _modes_mask(bounds: bool, race: bool, traffic: bool, coverage: bool) -> int:
    return ((MODE_BOUNDS if bounds else 0) | (MODE_RACE if race else 0) | (MODE_TRAFFIC if traffic else 0)
            | (MODE_COVERAGE if traffic and coverage else 0))


# ------------------------------------------------------------------ records ----
@dataclasses.dataclass(frozen=True)
class BufferTraffic:
    """Accesses the kernel made to one [[buffer(i)]] parameter during one launch."""

    name: str
    kind: str  # "input" | "output" | "aux" (an input's _shape/_strides/_ndim)
    itemsize: int
    nbytes: int
    bytes_read: int
    bytes_written: int
    distinct_read: int  # distinct elements read at least once (coverage mode)
    distinct_written: int
    read_ops: int  # load instructions (a float4 load is one op of 16 bytes)
    write_ops: int

    @property
    def size(self) -> int:
        """Elements in the buffer."""
        return self.nbytes // self.itemsize

    @property
    def elements_read(self) -> float:
        """Elements read, counting repeats (bytes read / itemsize)."""
        return self.bytes_read / self.itemsize

    @property
    def elements_written(self) -> float:
        return self.bytes_written / self.itemsize


@dataclasses.dataclass(frozen=True)
class LaunchRecord:
    """One evaluated launch of an emulated kernel."""

    name: str  # the `name=` of metal_kernel
    func_name: str  # MLX's custom_kernel_... name
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    modes: int
    groups_run: int
    threads_run: int
    switches: int
    seconds: float
    buffers: dict[str, BufferTraffic]

    def __getitem__(self, buffer_name: str) -> BufferTraffic:
        return self.buffers[buffer_name]

    @property
    def bytes_read(self) -> int:
        return sum(b.bytes_read for b in self.buffers.values())

    @property
    def bytes_written(self) -> int:
        return sum(b.bytes_written for b in self.buffers.values())


_log_lock = threading.Lock()
_log: list[LaunchRecord] = []


def _kind(flags: int) -> str:
    if flags & _abi.BUF_OUTPUT:
        return "output"
    return "aux" if flags & _abi.BUF_AUX else "input"


def _record(name, func_name, grid, tg, modes, groups_run, threads_run, switches, secs, bufs) -> LaunchRecord:
    buffers = {}
    for bname, itemsize, flags, nbytes, st in bufs:
        buffers[bname] = BufferTraffic(bname, _kind(flags), itemsize, nbytes, st[0], st[1], st[2], st[3], st[4],
                                       st[5])
    return LaunchRecord(name, func_name, tuple(grid), tuple(tg), modes, groups_run, threads_run, switches, secs,
                        buffers)


def _sync_log() -> None:
    ext = _build._ext
    if ext is None:
        return
    recs = ext.drain_launches()
    if recs:
        with _log_lock:
            _log.extend(_record(*r) for r in recs)


def launches() -> list[LaunchRecord]:
    """Every launch evaluated so far in this process (oldest first), until `clear_launches()`."""
    _sync_log()
    with _log_lock:
        return list(_log)


def clear_launches() -> None:
    _sync_log()
    with _log_lock:
        _log.clear()


def last_launch(name: str | None = None) -> LaunchRecord:
    """The most recent evaluated launch (of kernel `name` if given)."""
    for r in reversed(launches()):
        if name is None or r.name == name:
            return r
    raise LookupError(f"no emulated launch{'' if name is None else f' of `{name}`'} was evaluated")


class LaunchRecorder:
    """Collects the launches evaluated while it is active (`with LaunchRecorder() as rec:`)."""

    def __init__(self):
        self._start = None
        self._stop = None

    def __enter__(self):
        self._start = len(launches())
        self._stop = None
        return self

    def __exit__(self, *exc):
        self._stop = len(launches())
        return False

    @property
    def launches(self) -> list[LaunchRecord]:
        all_ = launches()
        return all_[self._start:self._stop] if self._start is not None else []

    def last(self, name: str | None = None) -> LaunchRecord:
        for r in reversed(self.launches):
            if name is None or r.name == name:
                return r
        raise LookupError(f"no emulated launch{'' if name is None else f' of `{name}`'} was recorded")

    def of(self, name: str) -> list[LaunchRecord]:
        return [r for r in self.launches if r.name == name]


# ------------------------------------------------------------------- kernel ----
@dataclasses.dataclass
class _Compiled:
    source: str
    parsed: _translate.ParsedKernel
    fn: int
    lib: ctypes.CDLL
    so_path: str


_compiled_lock = threading.Lock()
_compiled: dict[str, _Compiled] = {}


def _to_array(x) -> mx.array:
    if isinstance(x, mx.array):
        return x
    if isinstance(x, bool):
        return mx.array(x, dtype=mx.bool_)
    if isinstance(x, int):
        return mx.array(x, dtype=mx.int32)
    if isinstance(x, float):
        return mx.array(x, dtype=mx.float32)
    return mx.array(x)


def _triple(t, what: str) -> tuple[int, int, int]:
    t = tuple(int(v) for v in t)
    if len(t) != 3:
        raise ValueError(f"[metal_kernel] `{what}` must have 3 dimensions")
    if any(v < 0 or v >= 2**32 for v in t):
        raise ValueError(f"[metal_kernel] `{what}` entries must fit in uint32, got {t}")
    return t


class MetalKernel:
    """Same factory and call signature as `mx.fast.metal_kernel`; runs on the CPU emulator.

    Checking modes (keyword-only, per kernel object): bounds, race, traffic, coverage.
    """

    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str], source: str,
                 header: str = "", ensure_row_contiguous: bool = True, atomic_outputs: bool = False, *,
                 bounds: bool = DEFAULT_MODES["bounds"], race: bool = DEFAULT_MODES["race"],
                 traffic: bool = DEFAULT_MODES["traffic"], coverage: bool = DEFAULT_MODES["coverage"]):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = bool(ensure_row_contiguous)
        self.atomic_outputs = bool(atomic_outputs)
        self.modes = _modes_mask(bounds, race, traffic, coverage)

    def __repr__(self):
        return f"<emulated metal_kernel {self.name!r} modes={self.modes}>"

    # -- source and compilation
    def generated_source(self, input_sig, output_dtypes, template=None) -> str:
        """MLX's generated Metal source for this signature ([(dtype, 's'|'c'|'d')] per input)."""
        return _source.generated_source(name=self.name, input_names=self.input_names, output_names=self.output_names,
                                        source=self.source, header=self.header, atomic_outputs=self.atomic_outputs,
                                        input_sig=input_sig, output_dtypes=output_dtypes, template=template)

    def _compile(self, src: str) -> _Compiled:
        with _compiled_lock:
            c = _compiled.get(src)
            if c is not None:
                return c
        tu, parsed = _translate.translation_unit(src, self.name)
        lib, fn, so = _build.kernel_library(tu, self.name)
        c = _Compiled(src, parsed, fn, lib, str(so))
        with _compiled_lock:
            _compiled[src] = c
        return c

    def _plan(self, parsed: _translate.ParsedKernel, ndims: list[int]):
        """(kind, index) per [[buffer(i)]], replaying MLX's write_signature order, checked against the parse."""
        plan, names = [], []
        for i, n in enumerate(self.input_names):
            plan.append((_KIND_IN, i))
            names.append(n)
            if ndims[i] > 0:
                for suffix, kind in (("_shape", _KIND_SHAPE), ("_strides", _KIND_STRIDES), ("_ndim", _KIND_NDIM)):
                    if n + suffix in self.source:
                        plan.append((kind, i))
                        names.append(n + suffix)
        for k, n in enumerate(self.output_names):
            plan.append((_KIND_OUT, k))
            names.append(n)
        got = [b.name for b in parsed.buffers]
        if got != names:
            raise EmulatorError(f"[metal_emulator] buffer plan {names} does not match the generated signature {got}")
        itemsizes = []
        for (kind, _), b in zip(plan, parsed.buffers):
            itemsizes.append({_KIND_SHAPE: 4, _KIND_STRIDES: 8, _KIND_NDIM: 4}.get(kind, b.itemsize))
        return plan, names, itemsizes

    def _prepare(self, inputs, output_shapes, output_dtypes, template):
        def check_size(actual, expected, what):
            if actual != expected:
                raise ValueError(f"[metal_kernel] Expected `{what}` to have size {expected} but got size {actual}.")

        check_size(len(inputs), len(self.input_names), "inputs")
        check_size(len(output_shapes), len(self.output_names), "output_shapes")
        check_size(len(output_dtypes), len(self.output_names), "output_dtypes")
        _source.template_key(template)  # validates
        return inputs

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None):
        inputs = [_to_array(x) for x in inputs]
        self._prepare(inputs, output_shapes, output_dtypes, template)
        output_dtypes = list(output_dtypes)
        sig = [(a.dtype, _source.input_kind(a)) for a in inputs]
        src = self.generated_source(sig, output_dtypes, template)
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{src}\n```")
        comp = self._compile(src)
        plan, names, itemsizes = self._plan(comp.parsed, [a.ndim for a in inputs])
        ext = _build.extension()
        s = stream if isinstance(stream, mx.Stream) and stream.device == mx.cpu else None
        outs = ext.launch(inputs, [tuple(int(d) for d in sh) for sh in output_shapes], output_dtypes, comp.fn,
                          self.name, comp.parsed.func_name, plan, names, itemsizes, _triple(grid, "grid"),
                          _triple(threadgroup, "threadgroup"), self.modes, self.ensure_row_contiguous,
                          None if init_value is None else float(init_value), s)
        return list(outs)

    # -- sparse entry point
    def run_sparse(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, groups=None, template=None,
                   init_value=None, outputs=None):
        """Run chosen threadgroups directly (no MLX graph) on partly materialised buffers.

        inputs: SparseBuffer, numpy arrays or Python scalars (float -> float32, int -> int32, bool).
        outputs: optional SparseBuffers to write into (else fresh ones, zero-filled pages, NOT poisoned;
        filled with init_value if given, which touches every page). groups: iterable of threadgroup
        positions (x, y, z) to run (None: the whole grid). Returns (outputs, LaunchRecord).
        Raises EmulatorError on any kernel error.
        """
        if len(inputs) != len(self.input_names):
            raise ValueError(f"[metal_kernel] Expected `inputs` to have size {len(self.input_names)} but got size "
                             f"{len(inputs)}.")
        ins = [x if isinstance(x, SparseBuffer) else _HostArray.wrap(x) for x in inputs]
        output_dtypes = list(output_dtypes)
        if outputs is None:
            outputs = [SparseBuffer(sh, dt) for sh, dt in zip(output_shapes, output_dtypes)]
            if init_value is not None:
                for o in outputs:
                    o.array[...] = init_value
        sig = [(x.dtype, "s" if x.ndim == 0 else ("c" if x.size < 8 else "d")) for x in ins]
        src = self.generated_source(sig, output_dtypes, template)
        comp = self._compile(src)
        plan, names, itemsizes = self._plan(comp.parsed, [x.ndim for x in ins])
        keep = []
        bufs = (_abi.EmuBuffer * len(plan))()
        for j, ((kind, idx), nm, isz) in enumerate(zip(plan, names, itemsizes)):
            b = bufs[j]
            nm_b = nm.encode()
            keep.append(nm_b)
            b.name = nm_b
            b.itemsize = isz
            if kind == _KIND_OUT:
                o = outputs[idx]
                b.ptr, b.nbytes, b.flags = o.ptr, o.nbytes, _abi.BUF_OUTPUT | _abi.BUF_GUARDED
            elif kind == _KIND_IN:
                x = ins[idx]
                b.ptr, b.nbytes = x.ptr, x.nbytes
                b.flags = _abi.BUF_INPUT | (_abi.BUF_GUARDED if isinstance(x, SparseBuffer) else 0)
            else:
                x = ins[idx]
                if kind == _KIND_SHAPE:
                    aux = np.array(x.shape, dtype=np.int32)
                elif kind == _KIND_STRIDES:
                    aux = np.array(_row_strides(x.shape), dtype=np.int64)
                else:
                    aux = np.array([x.ndim], dtype=np.int32)
                keep.append(aux)
                b.ptr, b.nbytes, b.flags = aux.ctypes.data, aux.nbytes, _abi.BUF_INPUT | _abi.BUF_AUX
        gl = None
        launch = _abi.EmuLaunch()
        launch.abi = _abi.ABI_VERSION
        launch.nbuf = len(plan)
        launch.bufs = bufs
        launch.grid[:] = _triple(grid, "grid")
        launch.tg[:] = _triple(threadgroup, "threadgroup")
        launch.modes = self.modes
        launch.max_threads = 1024
        if groups is not None:
            flat = [int(v) for gpos in groups for v in _triple(gpos, "groups entry")]
            gl = (ctypes.c_uint32 * max(1, len(flat)))(*flat)
            launch.groups = gl
            launch.ngroups = len(flat) // 3
            if not flat:
                raise ValueError("[metal_emulator] `groups` is empty")
        err = ctypes.create_string_buffer(8192)
        launch.err = ctypes.addressof(err)
        launch.errlen = len(err)
        fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_abi.EmuLaunch))(comp.fn)
        t0 = time.perf_counter()
        rc = fn(ctypes.byref(launch))
        secs = time.perf_counter() - t0
        rec = _record(self.name, comp.parsed.func_name, tuple(launch.grid), tuple(launch.tg), self.modes,
                      launch.groups_run, launch.threads_run, launch.switches, secs,
                      [(names[j], bufs[j].itemsize, bufs[j].flags, bufs[j].nbytes, list(bufs[j].stats))
                       for j in range(len(plan))])
        _sync_log()
        with _log_lock:
            _log.append(rec)
        if rc == 2:
            raise ValueError(err.value.decode(errors="replace"))
        if rc != 0:
            raise EmulatorError(err.value.decode(errors="replace"))
        return outputs, rec


def _row_strides(shape) -> list[int]:
    st, acc = [], 1
    for d in reversed(list(shape)):
        st.append(acc)
        acc *= int(d)
    return list(reversed(st))


def metal_kernel(name: str, input_names: Sequence[str], output_names: Sequence[str], source: str, header: str = "",
                 ensure_row_contiguous: bool = True, atomic_outputs: bool = False, **modes) -> MetalKernel:
    """Drop-in for `mx.fast.metal_kernel` that runs the kernel on the CPU emulator.

    Extra keyword-only modes: bounds=True, race=False, traffic=True, coverage=True.
    """
    unknown = set(modes) - set(DEFAULT_MODES)
    if unknown:
        raise TypeError(f"metal_kernel() got unknown emulator modes {sorted(unknown)}; known: {sorted(DEFAULT_MODES)}")
    return MetalKernel(name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs, **modes)


# ------------------------------------------------------------- sparse buffers ----
_NP_OF_MX = {
    mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.int32: np.int32,
    mx.uint32: np.uint32, mx.int64: np.int64, mx.uint64: np.uint64, mx.int16: np.int16, mx.uint16: np.uint16,
    mx.int8: np.int8, mx.uint8: np.uint8, mx.bool_: np.bool_,
}
_MX_OF_NP = {np.dtype(np.float32): mx.float32, np.dtype(np.float16): mx.float16, np.dtype(np.int32): mx.int32,
             np.dtype(np.uint32): mx.uint32, np.dtype(np.int64): mx.int64, np.dtype(np.uint64): mx.uint64,
             np.dtype(np.int16): mx.int16, np.dtype(np.uint16): mx.uint16, np.dtype(np.int8): mx.int8,
             np.dtype(np.uint8): mx.uint8, np.dtype(np.bool_): mx.bool_}
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
GUARD_BYTES = 1 << 34  # must equal kGuard in emu_runtime.cpp


class SparseBuffer:
    """A buffer of any size whose pages exist only once touched (anonymous MAP_NORESERVE mapping), with
    16 GiB of untouched address space on each side so out-of-bounds accesses are attributed to it.

    `.array` is a numpy view (bfloat16 is stored as uint16 bits). Write only the rows the chosen
    threadgroups read; read back only what they wrote.
    """

    def __init__(self, shape, dtype: mx.Dtype):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.np_dtype = np.dtype(_NP_OF_MX[dtype])
        self.size = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        self.ndim = len(self.shape)
        self.nbytes = self.size * self.np_dtype.itemsize
        body = max(mmap.PAGESIZE, -(-self.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
        self._map = mmap.mmap(-1, GUARD_BYTES + body + GUARD_BYTES,
                              flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) | _MAP_NORESERVE,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.array = np.frombuffer(self._map, dtype=self.np_dtype, count=self.size, offset=GUARD_BYTES
                                   ).reshape(self.shape)
        self.ptr = self.array.ctypes.data

    def __repr__(self):
        return f"SparseBuffer(shape={self.shape}, dtype={self.dtype})"


class _HostArray:
    """A small dense host input of the sparse path (numpy array or Python scalar)."""

    def __init__(self, a: np.ndarray, dtype: mx.Dtype):
        # Not np.ascontiguousarray: it turns a 0-d array into shape (1,), and a scalar input would get
        # MLX's `constant T*` signature instead of `constant T&` (a kernel doing `size_t(n)` on it then
        # converts the pointer, not the value).
        self.array = np.asarray(a, order="C")
        self.dtype = dtype
        self.shape = self.array.shape
        self.ndim = self.array.ndim
        self.size = self.array.size
        self.nbytes = self.array.nbytes
        self.ptr = self.array.ctypes.data

    @staticmethod
    def wrap(x):
        if isinstance(x, bool):
            return _HostArray(np.array(x, dtype=np.bool_), mx.bool_)
        if isinstance(x, int):
            return _HostArray(np.array(x, dtype=np.int32), mx.int32)
        if isinstance(x, float):
            return _HostArray(np.array(x, dtype=np.float32), mx.float32)
        if isinstance(x, mx.array):
            dt = x.dtype
            a = np.array(x.view(mx.uint16) if dt == mx.bfloat16 else x)
            return _HostArray(a, dt)
        a = np.asarray(x)
        if a.dtype == np.float64:
            a = a.astype(np.float32)
        if a.dtype not in _MX_OF_NP:
            raise TypeError(f"[metal_emulator] unsupported sparse-path input dtype {a.dtype}")
        return _HostArray(a, _MX_OF_NP[a.dtype])
