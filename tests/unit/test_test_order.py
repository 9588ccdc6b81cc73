"""The suite's own ordering rule (tests/conftest.py): pytest-randomly shuffles modules and the
tests within them, but a module marked `in_order` keeps its written order. Checked by running
a small suite in a subprocess under several seeds."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.unit

ORDERED = '''
import pytest
pytestmark = pytest.mark.in_order
seen = []
@pytest.mark.parametrize("n", [1, 2, 3])
def test_a(n): seen.append(f"a{n}")
def test_b(): seen.append("b")
def test_c(): seen.append("c")
def test_d(): assert seen == ["a1", "a2", "a3", "b", "c"], seen
'''
SHUFFLED = '''
import pytest
seen = []
{tests}
def test_zz_order(): seen.append("last")
'''


def run_suite(directory, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "randomly", "-p", "no:cacheprovider",
         "--rootdir", str(directory), *options, str(directory)],
        capture_output=True, text=True, timeout=120, env=env, cwd=directory,
    )


def test_an_in_order_module_keeps_its_written_order_under_every_shuffle(tmp_path):
    pytest.importorskip("pytest_randomly")
    (tmp_path / "test_ordered.py").write_text(ORDERED)
    tests = "\n".join(f"def test_{i}(): seen.append({i})" for i in range(8))
    (tmp_path / "test_shuffled.py").write_text(SHUFFLED.format(tests=tests))
    orders = set()
    for seed in (1, 2, 3, 4):
        result = run_suite(tmp_path, f"--randomly-seed={seed}")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        collected = run_suite(tmp_path, f"--randomly-seed={seed}", "--collect-only")
        orders.add(tuple(line for line in collected.stdout.splitlines() if "test_shuffled.py::" in line))
    assert len(orders) > 1  # the unmarked module was shuffled: the seeds did reorder
