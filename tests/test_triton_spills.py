"""No register spills in any configuration the autotuners can pick: every attention and linear configuration that
their pruning keeps on the model's dtype paths (bf16 / fp32; attention D = 64 and 128, with InternViT-6B's QK-norm)
is compiled for sm_90 through ptxas (``python -m internvl_kernels.ops.aot_check --pickable``, no GPU needed) and
the spill bytes ``ptxas -v`` reports are listed per configuration; any spill fails.

Marked ``slow`` (about 20 compilations, 5-10 minutes on two cores): ``python -m pytest tests/test_triton_spills.py
-m slow``. The default suite's tests/test_triton_compile.py applies the same no-spill rule to one representative
configuration per kernel and dtype path."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"^(ok   |SPILL|SMEM!) (.+?): (\d+) B shared, (-?\d+) regs, spills (\d+) B stores / (\d+) B loads")


@pytest.mark.slow
def test_pickable_configs_do_not_spill():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "internvl_kernels.ops.aot_check", "--pickable"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=2400)
    if r.returncode != 0 and "ptxas" in (r.stdout + r.stderr) and "not found" in (r.stdout + r.stderr).lower():
        pytest.skip("this triton install has no bundled ptxas")
    rows = [m.groups() for m in map(LINE.match, r.stdout.splitlines()) if m]
    table = "\n".join(f"{tag} {name}: {stores} B spill stores, {loads} B spill loads, {regs} regs"
                      for tag, name, _, regs, stores, loads in rows)
    assert "FAIL " not in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
    names = [name for _, name, *_ in rows]
    assert sum(n.startswith("attention") for n in names) >= 8 and sum(n.startswith("linear") for n in names) >= 6, table
    assert all(int(regs) > 0 for *_, regs, _, _ in rows), "ptxas -v output was not read:\n" + table
    spilled = [row for row in rows if int(row[4]) or int(row[5])]
    assert not spilled, "configurations the autotuners can pick spill registers:\n" + table
    assert r.returncode == 0, r.stdout[-4000:]
