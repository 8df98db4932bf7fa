"""scripts/gpu_check.sh's plan (GPU_CHECK_PLAN=1 runs nothing): the steps of each part, in order, with
limits that fit the call's budget, and the budget cutting the last steps rather than the call."""
import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def plan(tmp_path, **env) -> tuple[int, list[tuple[str, int]], str]:
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    result = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "GPU_CHECK_PLAN": "1", "OUT": str(out), **env})
    steps = [(m[1], int(m[2])) for m in re.finditer(r"^== (\w+) \(limit (\d+) s\)", result.stdout, re.M)]
    if result.returncode != 2:  # everything streams to $OUT/log.txt
        assert (out / "log.txt").read_text() == result.stdout
    return result.returncode, steps, result.stdout


@pytest.mark.parametrize("part, order", [("1", ["build", "info", "tests", "graph"]),
                                         ("2", ["build", "timing", "ops", "step", "data"])])
def test_each_part_runs_its_steps_in_order_within_the_budget(tmp_path, part, order):
    """Part 2 as planned: right after part 1, on the warm machine that keeps its build."""
    rc, steps, out = plan(tmp_path, PART=part, GPU_CHECK_PLAN="1" if part == "1" else "warm")
    assert rc == 0, out
    names = [name for name, _ in steps]
    expected = order if part == "1" else order[1:]
    assert names == [n for n in expected if n in names] and set(expected) - set(names) <= {"info"}, out
    assert sum(limit for _, limit in steps) <= 330, steps
    if part == "1":
        assert "-v -rA --durations=25" in out and "-m gpu tests/test_infonce.py tests/test_momentum_update.py " \
            "tests/test_enqueue.py" in out and "tests/test_cuda_graph.py" in out


def test_the_budget_cuts_the_last_steps_and_parts_selects(tmp_path):
    rc, steps, out = plan(tmp_path, PART="1", GPU_CHECK_BUDGET_S="200")
    assert rc == 1 and "graph: skipped" in out, out  # build 120 + tests take the rest
    assert sum(limit for _, limit in steps) <= 200, steps
    rc, steps, out = plan(tmp_path, PART="2", PARTS="ops")
    assert rc == 0 and [name for name, _ in steps] == ["ops"], out
    rc, _, out = plan(tmp_path, PART="3")
    assert rc == 2


def test_the_variants_call_fits_one_call_and_times_old_and_new(tmp_path):
    """PARTS="build variants": the side-by-side kernel benchmark (issue 14) as its own call of <= 330 s on
    the warm machine right after part 2 (the build skipped)."""
    rc, steps, out = plan(tmp_path, PARTS="build variants", GPU_CHECK_BUDGET_S="330", GPU_CHECK_PLAN="warm")
    assert rc == 0 and [name for name, _ in steps] == ["variants", "variants"], out
    assert sum(limit for _, limit in steps) <= 330, steps
    assert "bench_ops.py --op infonce --variants" in out and "bench_ops.py --op momentum_update --variants" in out
