"""A real Slurm cluster, driven through its own commands (scontrol, sinfo, sbatch, scancel).

- Fleet: nodes, GPUs (gres) and the switch tree (`scontrol show topology`: a node's level-0
  switch is its leaf, that switch's parent its pod) come from `scontrol`.
- Cluster: a Slurm reservation on the chosen nodes (`Flags=IGNORE_JOBS`), so that nothing
  else is scheduled there and our jobs run with `--reservation`.
- Job: an `sbatch --requeue` script that runs one `supercluster train` (torchrun) per node
  through `srun`, with the c10d rendezvous on the first node. When a node dies Slurm requeues
  the job; `jobs.refresh` moves the reservation onto a replacement and releases it.

`$SLURM_CONF` at `fleet init` time is remembered in the fleet's settings, so later commands
talk to the same cluster.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from supercluster.cluster.backends.base import Backend, JobSpec, JobStatus, NodeSpec, canonical_gpu_type, node_command
from supercluster.errors import UserError

PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
RUNNING = {"RUNNING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESIZING", "STOPPED"}
FAILED = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def parse_record(line: str) -> dict[str, str]:
    """One `scontrol show ... -o` line as a dict (values may contain spaces only in Reason=)."""
    fields, key = {}, None
    for token in line.split(" "):
        m = re.match(r"^([A-Za-z][\w/:.]*)=(.*)$", token)
        if m:
            key = m.group(1)
            fields[key] = m.group(2)
        elif key and token:
            fields[key] += " " + token
    return fields


def node_state(slurm_state: str) -> str:
    """Slurm's compound state (e.g. IDLE+DRAIN, DOWN*, MIXED) as up | drain | down."""
    s = slurm_state.upper()
    if any(word in s for word in ("DOWN", "FAIL", "NOT_RESPONDING", "POWERED_DOWN")) or s.endswith("*"):
        return "down"
    if "DRAIN" in s:
        return "drain"
    return "up"


class SlurmBackend(Backend):
    name = "slurm"
    runs_jobs = True

    def __init__(self, settings: dict | None = None):
        super().__init__(settings)
        if "slurm_conf" not in self.settings and os.environ.get("SLURM_CONF"):
            self.settings["slurm_conf"] = os.environ["SLURM_CONF"]

    def srun_env(self) -> dict:
        """The environment for Slurm commands aimed at this fleet's cluster (its SLURM_CONF)."""
        env = dict(os.environ)
        if self.settings.get("slurm_conf"):
            env["SLURM_CONF"] = self.settings["slurm_conf"]
        return env

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        try:
            out = subprocess.run(args, env=self.srun_env(), capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise UserError(f"{args[0]} is not installed; install Slurm's client tools (scripts/install-system-packages.sh).") from None
        if check and out.returncode != 0:
            reason = (out.stderr or out.stdout).strip().splitlines()
            raise UserError(f"`{' '.join(args[:3])}` failed ({reason[-1] if reason else out.returncode}); check that slurmctld is up.")
        return out

    # ---- fleet ----------------------------------------------------------------------------

    def discover(self) -> list[NodeSpec]:
        leaf_of, pod_of_leaf = self._topology()
        specs = []
        for line in self._run("scontrol", "show", "node", "-o").stdout.splitlines():
            if not line.strip():
                continue
            rec = parse_record(line)
            gpu_type, gpus = self._gpus(rec.get("Gres", ""))
            if gpus == 0:
                continue  # a node without GPUs is not part of the accelerator fleet
            name = rec["NodeName"]
            leaf = leaf_of.get(name, "default")
            specs.append(NodeSpec(name, gpu_type, gpus, leaf, pod_of_leaf.get(leaf, leaf), rec.get("NodeAddr"),
                                  node_state(rec.get("State", "")), rec.get("Reason") or None))
        return specs

    def _gpus(self, gres: str) -> tuple[str, int]:
        """`gpu:8`, `gpu:h100:8` or `gpu:h100:8(S:0-1)` as (type, count)."""
        for item in gres.split(","):
            parts = re.sub(r"\(.*\)", "", item).split(":")
            if parts[0] != "gpu" or len(parts) < 2:
                continue
            count = int(parts[-1])
            if len(parts) == 3:
                try:
                    return canonical_gpu_type(parts[1]), count
                except UserError:
                    return parts[1].lower(), count
            return canonical_gpu_type(self.settings.setdefault("gpu_type", "local")), count
        return "", 0

    def _hostnames(self, hostlist: str) -> list[str]:
        return self._run("scontrol", "show", "hostnames", hostlist).stdout.split()

    def _topology(self) -> tuple[dict[str, str], dict[str, str]]:
        out = self._run("scontrol", "show", "topology", check=False)
        leaf_of, parent = {}, {}
        for line in out.stdout.splitlines():
            rec = parse_record(line.strip())
            if "SwitchName" not in rec:
                continue
            if rec.get("Level") == "0" and rec.get("Nodes"):
                for node in self._hostnames(rec["Nodes"]):
                    leaf_of[node] = rec["SwitchName"]
            if rec.get("Switches"):
                for child in self._hostnames(rec["Switches"]):
                    parent[child] = rec["SwitchName"]
        return leaf_of, parent

    def node_states(self) -> dict[str, tuple[str, str | None]]:
        out = self._run("sinfo", "-h", "-N", "-o", "%N|%T|%E")
        states = {}
        for line in out.stdout.splitlines():
            name, state, reason = (line.split("|", 2) + ["", ""])[:3]
            states[name] = (node_state(state), None if reason in ("", "none") else reason)
        return states

    def drain(self, node: str, reason: str) -> None:
        self._run("scontrol", "update", f"NodeName={node}", "State=DRAIN", f"Reason={reason}")

    def resume(self, node: str) -> None:
        out = self._run("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
        if out.returncode != 0 and "Invalid node state" not in out.stderr:  # already up: nothing to do
            raise UserError(f"Slurm refused to resume {node} ({out.stderr.strip()}); see `scontrol show node {node}`.")

    # ---- commands on nodes ------------------------------------------------------------------

    def _srun(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(["srun", *args], capture_output=True, text=True, timeout=timeout, env=self.srun_env())
        except FileNotFoundError:
            raise UserError("srun is not installed; install Slurm's client tools (scripts/install-system-packages.sh).") from None

    def run_on(self, node: str, argv: list[str], *, timeout: float, reservation: str | None = None,
               drained_reason: str | None = None) -> subprocess.CompletedProcess:
        """One task on `node` through srun; `--immediate` fails fast instead of queueing behind jobs.

        Slurm starts nothing on a DRAINED node, yet a drained node is exactly what a health
        re-check runs on; so with `drained_reason` the node is resumed in Slurm alone for the
        run and drained again with that reason right after (our books keep it drained, so
        placement never picks it meanwhile).
        """
        args = ["--nodes=1", "--ntasks=1", f"--nodelist={node}", "--immediate=60"]
        args += [f"--reservation={reservation}"] if reservation else []
        if drained_reason is not None:
            self.resume(node)
        try:
            return self._srun([*args, *argv], timeout)
        finally:
            if drained_reason is not None:
                self.drain(node, drained_reason)

    def launch_on(self, nodes: list[str], argv: list[str], *, tasks_per_node: int = 1, timeout: float,
                  reservation: str | None = None) -> subprocess.CompletedProcess:
        args = [f"--nodes={len(nodes)}", f"--ntasks-per-node={tasks_per_node}", f"--nodelist={','.join(nodes)}"]
        args += [f"--reservation={reservation}"] if reservation else []
        return self._srun([*args, *argv], timeout)

    # ---- clusters ---------------------------------------------------------------------------

    def reserve(self, cluster: str, nodes: list[str]) -> str:
        name = f"supercluster-{cluster}"
        self._run("scontrol", "create", "reservation", f"ReservationName={name}", f"Nodes={','.join(nodes)}",
                  "StartTime=now", "Duration=infinite", f"Users={_user()}", "Flags=IGNORE_JOBS")
        return name

    def update_reservation(self, ref: str, nodes: list[str]) -> None:
        self._run("scontrol", "update", f"ReservationName={ref}", f"Nodes={','.join(nodes)}")

    def release(self, ref: str) -> None:
        # Jobs just cancelled may still be ending in the reservation: Slurm refuses until they are gone.
        for _ in range(30):
            out = self._run("scontrol", "delete", f"ReservationName={ref}", check=False)
            text = (out.stderr + out.stdout).lower()
            if out.returncode == 0 or "invalid reservation" in text or "does not exist" in text:
                return
            time.sleep(1)
        raise UserError(f"Slurm refused to delete reservation {ref} ({out.stderr.strip()}); cancel its jobs first.")

    # ---- jobs -------------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> str:
        job_dir = Path(spec.job_dir)
        nnodes = 1 if spec.command else len(spec.nodes)  # a command of its own runs on the first node only
        cmd = node_command(spec, nnodes, node_rank="__NODE_RANK__", rdzv="__RDZV__")
        line = " ".join(shlex.quote(a) for a in cmd)
        line = line.replace("__NODE_RANK__", '"$SLURM_NODEID"').replace("__RDZV__", '"$SUPERCLUSTER_RDZV"')
        (job_dir / "node.sh").write_text(f"#!/bin/bash\n# One node's share of the job: one torchrun.\nexec {line}\n")
        reservation = f"#SBATCH --reservation={spec.reservation}\n" if spec.reservation else ""
        (job_dir / "job.sbatch").write_text(f"""#!/bin/bash
#SBATCH --job-name=supercluster-{spec.job_id}
#SBATCH --nodes={nnodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:{spec.gpus_per_node}
{reservation}#SBATCH --requeue
#SBATCH --output={job_dir}/slurm.log
#SBATCH --open-mode=append
#SBATCH --chdir={job_dir}
# The rendezvous lives on the first node, where this script runs: a port free there now,
# fresh for every restart so that a stale store from the last attempt is never joined.
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
addr=$(scontrol show node "$head" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
port=$({sys.executable} -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
export SUPERCLUSTER_RDZV="$addr:$port"
echo "supercluster: job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}} on $SLURM_JOB_NODELIST, rendezvous $SUPERCLUSTER_RDZV"
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash {job_dir}/node.sh
code=$?
if [ $code -ne 0 ]; then
  # When a node dies its peers fail first; wait for Slurm to notice (up to twice SlurmdTimeout)
  # so that it requeues the job (--requeue) instead of this script ending it as failed.
  timeout=$(scontrol show config | awk '/^SlurmdTimeout/ {{print $3}}')
  for _ in $(seq $(( ${{timeout:-300}} / 5 * 2 + 2 ))); do
    if sinfo -h -N -n "$SLURM_JOB_NODELIST" -o %T | grep -qiE 'down|fail|no_resp|\\*'; then
      echo "supercluster: a node of this job stopped responding; waiting for Slurm to requeue the job"
      sleep 600
    fi
    sleep 5
  done
fi
echo $code > {job_dir}/exit_code.tmp && mv {job_dir}/exit_code.tmp {job_dir}/exit_code
exit $code
""")
        out = self._run("sbatch", "--parsable", str(job_dir / "job.sbatch"))
        return out.stdout.strip().split(";")[0]

    def poll(self, ref: str, job_dir: str) -> JobStatus:
        out = self._run("scontrol", "show", "job", "-o", ref, check=False)
        if out.returncode != 0 or not out.stdout.strip():
            # Slurm forgot the job (MinJobAge passed): the script's own record says how it ended.
            code_file = Path(job_dir) / "exit_code"
            if code_file.exists():
                code = int(code_file.read_text())
                return JobStatus("completed" if code == 0 else "failed", code)
            return JobStatus("failed", None, detail="Slurm no longer knows the job and it left no exit code")
        rec = parse_record(out.stdout.strip().splitlines()[0])
        state = rec.get("JobState", "")
        exit_code = int(rec.get("ExitCode", "0:0").split(":")[0])
        restarts = int(rec.get("Restarts", "0"))
        nodes = tuple(self._hostnames(rec["NodeList"])) if rec.get("NodeList") not in (None, "", "(null)") else ()
        detail = rec.get("Reason") if rec.get("Reason") not in (None, "None") else None
        if state in PENDING:
            return JobStatus("pending", None, restarts, detail, nodes)
        if state in RUNNING:
            return JobStatus("running", None, restarts, detail, nodes)
        if state == "COMPLETED":
            return JobStatus("completed", exit_code, restarts, None, nodes)
        if state == "CANCELLED":
            return JobStatus("cancelled", exit_code, restarts, detail, nodes)
        if state == "NODE_FAIL":
            # Every job here is submitted with --requeue, so NODE_FAIL is the moment before Slurm puts
            # it back in the queue (REQUEUED, then PENDING with Restarts + 1). Read as the end, a poll
            # that lands in that moment (more likely on a loaded machine) would fail a job that is
            # about to be recovered; the next poll sees the requeue.
            return JobStatus("running", None, restarts, "a node failed; Slurm requeues the job", nodes)
        return JobStatus("failed", exit_code, restarts, f"Slurm state {state}" + (f": {detail}" if detail else ""), nodes)

    def cancel(self, ref: str, job_dir: str) -> None:
        self._run("scancel", ref, check=False)

    def release_requeued(self, ref: str) -> None:
        # Slurm holds a requeued job back (BeginTime ~2 minutes later); start it as soon as it fits.
        self._run("scontrol", "update", f"JobId={ref}", "StartTime=now", check=False)

    def log_path(self, ref: str | None, job_dir: str) -> str:
        return f"{job_dir}/slurm.log"


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
