"""`python -m kl_metal tune`: argument checks, candidate pruning, and the sweep's logic under the Metal
emulator (which settings it applies, what it reports and exports), never its timings."""
from __future__ import annotations

import argparse
import itertools
import os
import re

import pytest

from kl_metal import __main__ as cli
from kl_metal import metal, tune

SETTING_NAMES = [var.name for var in metal.SETTINGS]


@pytest.fixture
def clean_env(monkeypatch):
    for name in SETTING_NAMES + ["KL_METAL_BACKEND"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_parse_shape():
    assert tune.parse_shape("8192x128256") == (8192, 128256)
    assert tune.parse_shape("64X4096x512") == (64, 4096, 512)
    for bad in ("8192x", "x", "8192*128", "0x10", "-1x10", "", "8192x1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"--shape {bad!r} is invalid")):
            tune.parse_shape(bad)


def test_parse_sweep():
    assert tune.parse_sweep("KL_METAL_N_READS=2,8,2") == ("KL_METAL_N_READS", (2, 8))
    assert tune.parse_sweep("KL_METAL_THREADGROUP_SIZE=auto,256") == ("KL_METAL_THREADGROUP_SIZE", (None, 256))
    with pytest.raises(argparse.ArgumentTypeError, match="'KL_METAL_NOPE': not a launch setting"):
        tune.parse_sweep("KL_METAL_NOPE=1")
    with pytest.raises(argparse.ArgumentTypeError, match=r"'99' is not valid for KL_METAL_N_READS \(allowed: integers in \[1, 16\]\)"):
        tune.parse_sweep("KL_METAL_N_READS=4,99")
    with pytest.raises(argparse.ArgumentTypeError, match="'auto' is not valid for KL_METAL_N_READS"):
        tune.parse_sweep("KL_METAL_N_READS=auto")  # N_READS has a fixed default, no automatic value
    with pytest.raises(argparse.ArgumentTypeError, match="expected NAME=VALUE"):
        tune.parse_sweep("KL_METAL_N_READS")


def test_cli_rejects_bad_arguments_with_their_names(capsys):
    for argv, message in (
        (["--shape", "8192x", "--dtype", "float32"], "argument --shape: --shape '8192x' is invalid"),
        (["--shape", "8x8", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    ):
        with pytest.raises(SystemExit) as stop:
            cli.main(["tune", *argv])
        assert stop.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--axis 2 is out of range for --shape 8x8"):
        cli.main(["tune", "--shape", "8x8", "--dtype", "float32", "--axis", "2"])
    with pytest.raises(SystemExit, match="--repeats 0 is invalid"):
        cli.main(["tune", "--shape", "8x8", "--dtype", "float32", "--repeats", "0"])


def test_every_setting_has_valid_candidates():
    """A new KL_METAL_* launch setting must get candidates here, each accepted by its own parser."""
    assert set(tune.CANDIDATES) == set(SETTING_NAMES)
    for var in metal.SETTINGS:
        for value in tune.CANDIDATES[var.name]:
            assert value is None and var.default is None or var.parse(str(value)) == value, (var.name, value)


def test_candidates_are_distinct_launches_with_defaults_first(clean_env):
    values = tune.sweep_values([])
    found, combinations = tune.candidates(values, (8192, 128256, 1), metal.mx.bfloat16, "grad_inputs")
    assert combinations == len(list(itertools.product(*values.values())))
    assert found[0].settings == {var.name: var.default for var in metal.SETTINGS}
    assert len({c.launches for c in found}) == len(found)
    # A 128256-long row never uses the small kernel: its settings stay at their defaults in every candidate.
    assert {c.settings["KL_METAL_SMALL_ROWS_PER_THREADGROUP"] for c in found} == {None}
    assert {c.launches[0][1] for c in found} == {"looped"}
    assert len(found) == len({(c.settings["KL_METAL_THREADGROUP_SIZE"], c.settings["KL_METAL_N_READS"]) for c in found})
    assert os.environ.get("KL_METAL_N_READS") is None  # planning restores the environment


def test_says_so_and_fails_without_a_fused_backend(clean_env, capsys):
    clean_env.setattr(metal, "available", lambda device: (False, "no Metal on this test device"))
    assert cli.main(["tune", "--shape", "8192x128256", "--dtype", "bfloat16"]) == 1
    assert "No fused backend here (no Metal on this test device)" in capsys.readouterr().out


def test_fails_when_the_fallback_is_forced(clean_env, capsys, emulated_metal):
    clean_env.setenv("KL_METAL_BACKEND", "fallback")
    assert cli.main(["tune", "--shape", "4x300", "--dtype", "float32", "--repeats", "1"]) == 1
    assert "takes the fallback path" in capsys.readouterr().out


def _tune(capsys, *argv):
    status = cli.main(["tune", "--shape", "4x300", "--dtype", "float32", "--repeats", "1", *argv])
    return status, capsys.readouterr().out


def test_sweep_applies_each_candidate_and_exports_the_winner(clean_env, capsys, emulated_metal):
    status, out = _tune(capsys, "--sweep", "KL_METAL_N_READS=2,4", "--sweep", "KL_METAL_THREADGROUP_SIZE=auto,64")
    assert status == 0, out
    assert "4 setting combinations give 4 distinct launch configurations" in out
    assert all(f"[{i}/4]" in out for i in range(1, 5))
    # The block kernel's threadgroup is ceil(300 / N_READS) rounded up to 32, capped by THREADGROUP_SIZE:
    # each candidate really ran with its settings.
    forward = {record.threadgroup for record in emulated_metal.of("kl_forward_row")}
    assert {(160, 1, 1), (96, 1, 1), (64, 1, 1)} <= forward
    exports = [line for line in out.splitlines() if line.startswith("export ")]
    assert [line.split("=")[0] for line in exports] == ["export KL_METAL_N_READS", "export KL_METAL_THREADGROUP_SIZE"]
    assert exports[0] in ("export KL_METAL_N_READS=2", "export KL_METAL_N_READS=4")
    assert exports[1] in ("export KL_METAL_THREADGROUP_SIZE=  # empty: automatic", "export KL_METAL_THREADGROUP_SIZE=64")
    assert "KL_METAL_N_READS" not in os.environ and "KL_METAL_THREADGROUP_SIZE" not in os.environ


def test_candidates_that_change_the_results_are_rejected(clean_env, capsys, emulated_metal):
    clean_env.setattr(tune, "_difference", lambda result, baseline: 0.5)
    status, out = _tune(capsys, "--sweep", "KL_METAL_N_READS=4,2,8")
    assert status == 0
    assert out.count("rejected: results differ from the baseline's by 5.0e-01") == 2
    assert "export KL_METAL_N_READS=4" in out  # only the baseline is left


def test_candidates_that_fail_are_reported_and_skipped(clean_env, capsys, emulated_metal):
    real = tune._flat

    def refuse_one_candidate(result):
        if os.environ.get("KL_METAL_N_READS") == "8":
            raise RuntimeError("threadgroup too large for this kernel")
        return real(result)

    clean_env.setattr(tune, "_flat", refuse_one_candidate)
    status, out = _tune(capsys, "--sweep", "KL_METAL_N_READS=4,8")
    assert status == 0
    assert "failed: RuntimeError: threadgroup too large for this kernel" in out
    assert "export KL_METAL_N_READS=4" in out
