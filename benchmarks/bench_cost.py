"""The cost model against a measured run: configs/demo_grid.yaml's estimate on this machine's quick calibration,
then the same grid run for real, job by job, and the ratio estimated / measured in one run.

    python benchmarks/bench_cost.py            # about 3-4 minutes on 2 cores

The calibration and the FLOP counts go to a temporary folder, never the user's. On a loaded machine the measured
seconds grow and the ratio drops; read it on a quiet one (the suite checks only what load cannot change: every job
priced, FLOPs and bytes against closed forms, tests/test_cost.py).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["FMCACHE_CALIBRATION"] = str(folder / "calibration.json")
        os.environ["FMCACHE_FLOPS_CACHE"] = str(folder / "flops.json")
        from fmcache.cost.calibrate import calibrate
        from fmcache.grid.config import GridOptions
        from fmcache.grid.main import run_grid

        (folder / "configs").mkdir()
        config = folder / "configs" / "demo_grid.yaml"
        shutil.copy(REPO / "configs" / "demo_grid.yaml", config)
        calibrate(quick=True, log=lambda _m: None)
        plan = run_grid(config, GridOptions(dry_run=True), log=lambda _m: None)
        estimated = {job: doc["ours"]["seconds"] for job, doc in plan["cost"]["jobs"].items()}
        messages: list[str] = []
        run_grid(config, GridOptions(), log=messages.append)
        measured, current = {}, None
        for line in messages:
            if match := re.match(r"\[\d+/\d+\] (\S+)$", line):
                current = match.group(1)
            elif match := re.match(r"  done in ([\d.]+) s$", line):
                measured[current] = float(match.group(1))
        print(f"{'job':<60} {'estimated':>10} {'measured':>10}")
        for job in measured:
            print(f"{job:<60} {estimated.get(job, float('nan')):9.1f}s {measured[job]:9.1f}s")
        total_e, total_m = sum(estimated[j] for j in measured), sum(measured.values())
        print(f"total: estimated {total_e:.0f} s, measured {total_m:.0f} s; estimated / measured = "
              f"{total_e / total_m:.2f} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")  # fmt: skip


if __name__ == "__main__":
    main()
