"""The README's tour runs as written: its commands do not collide with one another."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from supercluster.train.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def tour() -> list[str]:
    """The command lines of the README's "A short tour" block, comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## A short tour\n\n```bash\n(.*?)```", text, re.S).group(1)
    return [line.split(" #")[0].strip() for line in block.splitlines() if line.startswith("supercluster ")]


def test_each_training_line_of_the_tour_writes_its_own_run_dir():
    runs = {}
    for line in tour():
        argv = shlex.split(line)
        if argv[1] != "train":
            continue
        overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        run_dir = load_config(ROOT / argv[2], overrides).run.dir
        assert run_dir not in runs, f"{line!r} trains into {run_dir}, as {runs.get(run_dir)!r} does"
        runs[run_dir] = line
    assert len(runs) >= 3


def test_the_fleet_lines_of_the_tour_run_in_order(tmp_path):
    lines = [line for line in tour() if line.split()[1] in ("fleet", "cluster", "job") and "--server" not in line]
    assert any("--backend sim" in line for line in lines) and any("--backend local" in line for line in lines)
    env = {**os.environ, "SUPERCLUSTER_HOME": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("SUPERCLUSTER_SERVER", None)
    for line in lines:
        proc = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{line!r} failed: {proc.stderr}"
    # the tour's job is a real training run: stop it rather than leave it behind
    jobs = json.loads(subprocess.run(["supercluster", "job", "list", "--json"], env=env, capture_output=True, text=True,
                                     timeout=60).stdout)
    assert len(jobs) == 1 and jobs[0]["cluster"] == "dev"
    for job in jobs:
        if job["state"] in ("pending", "running"):
            subprocess.run(["supercluster", "job", "cancel", str(job["id"])], env=env, capture_output=True, timeout=60)
