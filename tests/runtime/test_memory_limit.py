"""The memory a process may use (cgroup v2 / v1 limits, MemAvailable) and budgets checked against
it: a budget beyond it is refused with one line, one that leaves no room for the runtime warns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flashtier.errors import BudgetError
from flashtier.runtime.memory_limit import MemoryLimit, check_budget, memory_limit

MiB = 1 << 20


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_cgroup_v2_tightest_ancestor_wins(tmp_path):
    root = tmp_path / "cg"
    write(root / "a" / "memory.max", str(800 * MiB))
    write(root / "a" / "b" / "memory.max", "max")
    proc = write(tmp_path / "cgroup", "0::/a/b\n")
    meminfo = write(tmp_path / "meminfo", "MemTotal: 100 kB\nMemAvailable: 9000000 kB\n")
    lim = memory_limit(proc, root, meminfo)
    assert lim.bytes == 800 * MiB and "memory.max" in lim.source


def test_cgroup_v1_and_available_memory(tmp_path):
    root = tmp_path / "cg"
    write(root / "memory" / "job" / "memory.limit_in_bytes", str(1 << 62))  # v1's "no limit"
    proc = write(tmp_path / "cgroup", "5:memory:/job\n3:cpu,cpuacct:/job\n")
    meminfo = write(tmp_path / "meminfo", "MemAvailable: 2048 kB\n")
    assert memory_limit(proc, root, meminfo) == MemoryLimit(2 * MiB, "MemAvailable in /proc/meminfo")
    write(root / "memory" / "job" / "memory.limit_in_bytes", str(MiB))
    assert memory_limit(proc, root, meminfo).bytes == MiB
    assert memory_limit(tmp_path / "none", root, tmp_path / "none2") is None  # nothing readable: no check


def test_budgets_against_the_limit():
    lim = MemoryLimit(1000 * MiB, "test")
    assert check_budget(600 * MiB, lim) is None
    assert "warning" in check_budget(800 * MiB, lim) and "--dram-budget 700 MiB" in check_budget(800 * MiB, lim)
    with pytest.raises(BudgetError, match="more than this process may use: 1000 MiB .test.; give at most 700 MiB"):
        check_budget(1200 * MiB, lim)
    assert check_budget(1 << 50, None) is None


def test_cli_refuses_a_budget_beyond_the_machine_with_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "flashtier", "generate", str(Path(__file__).parents[2] / "models" / "tiny-moe"), "--prompt", "hi",
                        "--max-new-tokens", "1", "--dram-budget", "1000T"], capture_output=True, text=True)
    assert p.returncode != 0
    assert "more than this process may use" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_plan_and_generate_agree_on_a_moe_minimum_budget():
    """plan reserves the expert cache as generate does: a budget generate refuses, plan refuses."""
    model = str(Path(__file__).parents[2] / "models" / "tiny-moe")
    minimums = []
    for cmd in (["plan", model], ["generate", model, "--prompt", "hi", "--max-new-tokens", "1"]):
        p = subprocess.run([sys.executable, "-m", "flashtier", *cmd, "--dram-budget", "6M"], capture_output=True,
                           text=True)
        assert p.returncode != 0 and "below the minimum this model needs" in p.stderr, (cmd, p.stderr)
        assert "an expert cache of" in p.stderr
        minimums.append(p.stderr.split("needs (")[1].split(")")[0])
    assert minimums[0] == minimums[1]  # one computation: the same figures, expert cache included
