"""ctypes mirror of shim/emu_abi.h (the sparse entry point calls kernel .so files directly)."""

import ctypes
import re
from pathlib import Path

_H = (Path(__file__).parent / "shim" / "emu_abi.h").read_text()


def _define(name: str) -> int:
    return int(re.search(rf"#define {name} (\d+)", _H).group(1))


ABI_VERSION = _define("EMU_ABI_VERSION")
BUF_INPUT, BUF_OUTPUT, BUF_AUX, BUF_GUARDED = 1, 2, 4, 8
NSTATS = _define("EMU_NSTATS")


class EmuBuffer(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("nbytes", ctypes.c_uint64), ("itemsize", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("name", ctypes.c_char_p), ("stats", ctypes.c_uint64 * NSTATS)]


class EmuLaunch(ctypes.Structure):
    _fields_ = [("abi", ctypes.c_uint32), ("nbuf", ctypes.c_uint32), ("bufs", ctypes.POINTER(EmuBuffer)),
                ("grid", ctypes.c_uint32 * 3), ("tg", ctypes.c_uint32 * 3), ("modes", ctypes.c_uint32),
                ("max_threads", ctypes.c_uint32), ("groups", ctypes.POINTER(ctypes.c_uint32)),
                ("ngroups", ctypes.c_uint64), ("err", ctypes.c_void_p), ("errlen", ctypes.c_uint64),
                ("groups_run", ctypes.c_uint64), ("threads_run", ctypes.c_uint64), ("switches", ctypes.c_uint64)]
