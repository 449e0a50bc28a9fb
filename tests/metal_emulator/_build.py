"""Building and caching: the runtime object, kernel shared objects and the MLX extension.

Everything goes to the cache directory (`tests/metal_emulator/.cache/`, gitignored; override with
METAL_EMULATOR_CACHE_DIR), keyed by content hashes, written atomically (tmp + rename) under a
file lock, so parallel pytest workers and repeated CI runs compile each thing once.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from ._errors import EmulatorBuildError, EmulatorCompileError

HERE = Path(__file__).resolve().parent
SHIM_DIR = HERE / "shim"
EXT_DIR = HERE / "ext"

CXX = os.environ.get("METAL_EMULATOR_CXX") or os.environ.get("CXX") or "g++"
OPT = os.environ.get("METAL_EMULATOR_OPT", "-O1")
COMMON_FLAGS = ["-std=c++17", OPT, "-g1", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing",
                "-fno-exceptions", "-fno-rtti", "-fno-omit-frame-pointer", "-fno-stack-protector"]
if os.environ.get("METAL_EMULATOR_UCONTEXT"):  # portable fibers (the default on non-x86-64)
    COMMON_FLAGS.append("-DEMU_USE_UCONTEXT")
# Every load/store of the kernel TU becomes a call to __asan_{load,store}N_noabort (emu_runtime.cpp).
INSTRUMENT_FLAGS = ["-fsanitize=kernel-address", "--param", "asan-instrumentation-with-call-threshold=0",
                    "--param", "asan-stack=0", "--param", "asan-globals=0",
                    "-fno-sanitize-address-use-after-scope"]
KERNEL_WARNINGS = ["-w"]  # MSL attribute leftovers and unknown pragmas are expected; errors still show

_lock = threading.RLock()
_loaded: dict[str, tuple[ctypes.CDLL, int]] = {}
stats = {"kernels_compiled": 0, "compile_seconds": 0.0, "kernels_loaded": 0}


def cache_dir() -> Path:
    d = Path(os.environ.get("METAL_EMULATOR_CACHE_DIR") or (HERE / ".cache"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def _file_lock(name: str):
    path = cache_dir() / f".{name}.lock"
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


_compiler_id = None


def compiler_id() -> str:
    global _compiler_id
    if _compiler_id is None:
        exe = shutil.which(CXX)
        if not exe:
            raise EmulatorBuildError(f"[metal_emulator] C++ compiler {CXX!r} not found (set CXX or METAL_EMULATOR_CXX)")
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        _compiler_id = exe + "\n" + out.splitlines()[0] if out else exe
    return _compiler_id


def shim_hash() -> str:
    files = sorted(SHIM_DIR.glob("*"))
    return _sha(compiler_id(), COMMON_FLAGS, INSTRUMENT_FLAGS, *[(f.name, f.read_bytes()) for f in files])


def _run(cmd, what: str, cwd=None, source_path: Path | None = None, compile_error=False):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        msg = (r.stderr or "") + (r.stdout or "")
        lines = [ln for ln in msg.splitlines() if ln.strip()]
        errs = [ln for ln in lines if "error" in ln or "static assertion" in ln or "required from" in ln]
        shown = "\n".join((errs or lines)[:40])
        where = f"\n(translated source: {source_path})" if source_path else ""
        cls = EmulatorCompileError if compile_error else EmulatorBuildError
        raise cls(f"[metal_emulator] {what} failed:\n{shown}{where}")
    return r


def runtime_object() -> Path:
    """emu_runtime.cpp compiled once (not instrumented): linked into every kernel .so."""
    out = cache_dir() / f"emu_runtime-{shim_hash()}.o"
    if out.exists():
        return out
    with _lock, _file_lock("runtime"):
        if out.exists():
            return out
        tmp = out.with_suffix(f".tmp{os.getpid()}.o")
        _run([CXX, *COMMON_FLAGS, "-fexceptions", "-I", str(SHIM_DIR), "-c", str(SHIM_DIR / "emu_runtime.cpp"),
              "-o", str(tmp)], "compiling the emulator runtime")
        os.replace(tmp, out)
    return out


def kernel_library(tu: str, label: str) -> tuple[ctypes.CDLL, int, Path]:
    """Compile (or find in the cache) and load a kernel TU; returns (lib, address of emu_kernel_launch, path)."""
    key = _sha(shim_hash(), tu)
    with _lock:
        hit = _loaded.get(key)
        if hit:
            return hit[0], hit[1], cache_dir() / f"k-{key}.so"
        so = cache_dir() / f"k-{key}.so"
        if not so.exists():
            with _file_lock(f"k-{key}"):
                if not so.exists():
                    rt = runtime_object()
                    src = cache_dir() / f"k-{key}.cpp"
                    src.write_text(tu)
                    tmp = so.with_suffix(f".tmp{os.getpid()}.so")
                    t0 = time.perf_counter()
                    _run([CXX, *COMMON_FLAGS, *INSTRUMENT_FLAGS, *KERNEL_WARNINGS, "-I", str(SHIM_DIR), "-shared",
                          str(src), str(rt), "-o", str(tmp), "-Wl,-z,defs", "-Wl,-Bsymbolic", "-lm"],
                         f"compiling kernel `{label}`", source_path=src, compile_error=True)
                    stats["compile_seconds"] += time.perf_counter() - t0
                    stats["kernels_compiled"] += 1
                    os.replace(tmp, so)
        lib = ctypes.CDLL(str(so), mode=os.RTLD_LOCAL | os.RTLD_NOW)
        fn = ctypes.cast(lib.emu_kernel_launch, ctypes.c_void_p).value
        _loaded[key] = (lib, fn)
        stats["kernels_loaded"] += 1
        return lib, fn, so


# ---------------------------------------------------------------- extension ----
_ext = None


def _mlx_nanobind_abi() -> tuple[str | None, int | None]:
    import mlx.core as mx

    data = Path(mx.__file__).read_bytes()
    m = re.search(rb"nanobind_[A-Za-z0-9_]*?_v(\d+)", data)
    return (m.group(0).decode(), int(m.group(1))) if m else (None, None)


def _nanobind_abi() -> tuple[str, int | None]:
    try:
        import nanobind
    except ImportError as e:
        raise EmulatorBuildError("[metal_emulator] nanobind is not installed (pip install 'nanobind==3.0.1')") from e
    src = Path(nanobind.__file__).parent / "src" / "nb_internals.h"
    m = re.search(r"define\s+NB_INTERNALS_VERSION\s+(\d+)", src.read_text()) if src.exists() else None
    return nanobind.__version__, int(m.group(1)) if m else None


def check_abi() -> None:
    tag, mlx_v = _mlx_nanobind_abi()
    nb_version, nb_v = _nanobind_abi()
    if mlx_v is not None and nb_v is not None and mlx_v != nb_v:
        import mlx.core as mx

        raise EmulatorBuildError(
            f"[metal_emulator] nanobind {nb_version} has internals ABI v{nb_v}, but mlx {mx.__version__} was built "
            f"with ABI v{mlx_v} ({tag}); mx.array would not be accepted by the extension. Install the nanobind "
            f"release with ABI v{mlx_v} (nanobind==3.0.1 for mlx 0.32.x).")


def extension():
    """Import (building on first use) the _emu_ext module."""
    global _ext
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is not None:
            return _ext
        import mlx.core as mx

        check_abi()
        nb_version, _ = _nanobind_abi()
        files = [EXT_DIR / "host_kernel.cpp", EXT_DIR / "CMakeLists.txt", SHIM_DIR / "emu_abi.h"]
        key = _sha(mx.__version__, nb_version, sys.version, compiler_id(), *[f.read_bytes() for f in files])
        root = cache_dir() / f"ext-{key}"
        found = sorted(root.glob("build/_emu_ext*.so")) if root.exists() else []
        if not found:
            with _file_lock(f"ext-{key}"):
                found = sorted(root.glob("build/_emu_ext*.so")) if root.exists() else []
                if not found:
                    found = [_build_extension(root)]
        spec = importlib.util.spec_from_file_location("_emu_ext", found[0])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _ext = mod
        return mod


def _build_extension(root: Path) -> Path:
    cmake = shutil.which("cmake")
    if not cmake:
        raise EmulatorBuildError("[metal_emulator] cmake is needed to build the MLX extension (system cmake >= 3.18 "
                                 "or `pip install cmake`)")
    if root.exists():
        shutil.rmtree(root)
    src = root / "src"
    src.mkdir(parents=True)
    for f in ["host_kernel.cpp", "CMakeLists.txt"]:
        shutil.copy(EXT_DIR / f, src / f)
    build = root / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    env_cxx = [f"-DCMAKE_CXX_COMPILER={shutil.which(CXX)}"]
    _run([cmake, "-S", str(src), "-B", str(build), *gen, *env_cxx, "-DCMAKE_BUILD_TYPE=Release",
          f"-DPython_EXECUTABLE={sys.executable}", f"-DEMU_SHIM_DIR={SHIM_DIR}"], "configuring the MLX extension")
    _run([cmake, "--build", str(build), "-j", str(os.cpu_count() or 2)], "building the MLX extension")
    found = sorted(build.glob("_emu_ext*.so"))
    if not found:
        raise EmulatorBuildError(f"[metal_emulator] the extension build produced no module in {build}")
    return found[0]
