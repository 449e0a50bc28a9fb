"""The wheel ships the Metal sources, and an installed wheel finds them (not the source checkout's)."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    (path,) = out.glob("kl_metal-*.whl")
    return path


def test_wheel_contains_every_kernel_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".metal", ".h"))
    assert sources, "no kernel sources in kernels/"
    missing = [s for s in sources if f"kl_metal/kernels/{s}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert not any(n.startswith("tests/") for n in names), "test infrastructure must not ship"


def test_installed_wheel_loads_its_own_kernel_sources(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True, capture_output=True, text=True,
    )
    probe = "import kl_metal.metal as m; print(m.KERNEL_DIR); print(len(m.SOURCES), len(m.HEADER))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
        check=True, capture_output=True, text=True,
    )
    kernel_dir, counts = result.stdout.splitlines()
    assert Path(kernel_dir) == target / "kl_metal" / "kernels"
    sources, header = map(int, counts.split())
    assert sources >= 3 and header > 0
