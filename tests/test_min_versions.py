"""setup.cfg's declared minimums, tested (bench/min_versions.sh): the core of the suite with the
lowest transformers setup.cfg admits, in a scratch interpreter the tests' child processes
inherit. Slow (pip, a scratch environment, 2-rank training) and needs the package registry."""

from __future__ import annotations

import configparser
import os
import subprocess

import pytest

from tests.support import ROOT

# A cut of the script's default list that still trains: the model and loss tests, the fp16
# ZeRO-0 loss-scale test and one setting of the matrix (2 CPU ranks against the reference).
CORE = ("tests/test_model.py tests/test_model_config.py tests/test_loss.py "
        "tests/test_engine.py::test_fp16_zero0_gradients_carry_the_loss_scale_once "
        "tests/test_matrix.py::test_matrix_pairwise[fp16-Z0-nockpt-adamw-chunked-acc2]")


@pytest.mark.slow
def test_the_declared_minimum_transformers_runs_the_core_tests():
    r = subprocess.run(["bash", "bench/min_versions.sh"], cwd=ROOT, capture_output=True,
                       text=True, timeout=1800, env={**os.environ, "MIN_TESTS": CORE})
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    ran = next(line for line in r.stdout.splitlines() if "versions that ran" in line)
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    low = next(line.split(">=")[1].split(",")[0].strip() for line in
               cfg.get("options", "install_requires").splitlines()
               if line.strip().startswith("transformers>="))
    assert f"transformers {low}" in ran, ran
