"""This machine as a one-node fleet; jobs are local process trees.

A job runs `supercluster train` under a small detached runner (`python -m
supercluster.cluster.backends.local JOB_DIR -- CMD...`) that records the exit code, with its
own ref, in JOB_DIR/exit_code when the command ends, so any later `supercluster job status` can tell how it
ended. Restarts after a crash are torchrun's (`--max-restarts`), not ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from supercluster.cluster.backends.base import Backend, JobSpec, JobStatus, NodeSpec, node_command
from supercluster.files import write_atomic


def _detect_gpus() -> tuple[str, int]:
    from supercluster.hardware.device import local_devices

    devices = local_devices()
    if devices.count:
        from supercluster.cluster.backends import canonical_gpu_type
        from supercluster.errors import UserError

        try:
            gpu_type = canonical_gpu_type(devices.name.split()[-1])
        except UserError:
            gpu_type = devices.name.lower().replace(" ", "-")
        return gpu_type, devices.count
    # No accelerator: the CPU is the "GPU" and each rank is a process sharing its cores.
    return "local", os.cpu_count() or 1


CANCEL_GRACE_S = 30.0  # a cancelled job's time to end on SIGTERM before SIGKILL (Slurm's KillWait)


class LocalBackend(Backend):
    name = "local"
    runs_jobs = True

    def discover(self) -> list[NodeSpec]:
        gpu_type, count = _detect_gpus()
        gpus = int(self.settings.get("gpus") or count)
        self.settings["gpus"] = gpus
        return [NodeSpec(socket.gethostname(), gpu_type, gpus, "local", "local", "127.0.0.1")]

    def run_on(self, node: str, argv: list[str], *, timeout: float, reservation: str | None = None,
               drained_reason: str | None = None) -> subprocess.CompletedProcess:
        """The fleet's one node is this machine: run here (no scheduler holds or drains it)."""
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def submit(self, spec: JobSpec) -> str:
        job_dir = Path(spec.job_dir)
        cmd = node_command(spec, 1, torchrun_restarts=spec.max_restarts)
        log = open(job_dir / "job.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "supercluster.cluster.backends.local", str(job_dir), "--", *cmd],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        # Reaped as soon as it ends (a long-lived server would otherwise keep a zombie per job);
        # the ref carries the runner's start time, so a pid the kernel reuses is never taken for it.
        threading.Thread(target=proc.wait, daemon=True, name=f"reap-{proc.pid}").start()
        return f"{proc.pid}:{_start_time(proc.pid)}"

    def poll(self, ref: str, job_dir: str) -> JobStatus:
        code_file = Path(job_dir) / "exit_code"
        if (Path(job_dir) / STOPPING).exists() and _alive(ref):
            return JobStatus("running")  # waiting for its preempted run to end: the exit code is that one's
        # "CODE REF": a code that another runner of this job dir left (a preempted one, ending
        # late) is not this one's
        code, _, writer = (code_file.read_text().partition(" ") if code_file.exists() else ("", "", ""))
        if code and writer.strip() in ("", ref):
            return JobStatus("completed" if int(code) == 0 else "failed", int(code))
        if _alive(ref):
            return JobStatus("running")
        return JobStatus("failed", None, detail="the job's runner ended without recording an exit code")

    def cancel(self, ref: str, job_dir: str, grace_s: float = CANCEL_GRACE_S) -> None:
        """SIGTERM to the job's process group, and SIGKILL past `grace_s` (as Slurm's KillWait) by a
        detached killer, so a job that ignores SIGTERM still ends and nobody here waits for it."""
        try:
            if not _alive(ref):
                return
            os.killpg(_pid(ref), signal.SIGTERM)  # the runner leads its own session: this reaches torchrun and its ranks
        except ProcessLookupError:
            return
        _detached("--kill-after", ref, str(grace_s))

    def preempt(self, ref: str, job_dir: str, grace_s: float = 60.0) -> None:
        """SIGTERM to the job's process group (the trainer checkpoints the step it is in), and a
        detached stopper that waits for it to end and SIGKILLs it past `grace_s` (the exit code it
        leaves names it, so poll never takes it for the restarted job's). This returns at once: it runs inside the fleet's
        transaction, often for a request. Until the stopper is done, JOB_DIR/stopping names the
        stopped runner, and a runner started again in the same job dir waits for it to go: the job
        restarts in the same run dir, which two trainers must never share."""
        if not _alive(ref):
            return
        write_atomic(Path(job_dir) / STOPPING, ref)  # before the signal: a restart sees it whatever comes next
        with contextlib.suppress(ProcessLookupError):
            os.killpg(_pid(ref), signal.SIGTERM)
        _detached("--stop", ref, job_dir, str(grace_s))


STOPPING = "stopping"  # in a job dir: the ref of a preempted runner still being stopped


def _detached(*args: str) -> None:
    """Runs this module with `args` in its own session (it outlives a request or a server), reaped here."""
    proc = subprocess.Popen([sys.executable, "-m", "supercluster.cluster.backends.local", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    threading.Thread(target=proc.wait, daemon=True, name=f"reap-{proc.pid}").start()


def _kill_after(ref: str, grace_s: float) -> float:
    """Waits for the group of `ref` to end, SIGKILLs it past `grace_s`; returns the deadline."""
    deadline = time.monotonic() + grace_s
    while _group_alive(_pid(ref)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(_pid(ref)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(_pid(ref), signal.SIGKILL)
    return deadline


def _stop(ref: str, job_dir: str, grace_s: float) -> None:
    """The stopper of a preempted runner: wait for its group to end, SIGKILL it past `grace_s`,
    let the runner record its exit code (under its own ref), then remove the `stopping` mark."""
    deadline = _kill_after(ref, grace_s)
    while _alive(ref) and time.monotonic() < deadline + 10:
        time.sleep(0.1)
    (Path(job_dir) / STOPPING).unlink(missing_ok=True)


def _wait_for_stopper(job_dir: str) -> None:
    """Until a preempted runner of this job dir is gone (its stopper removes the mark; a mark whose
    runner and group are gone, its stopper having died or being about to, is removed here)."""
    mark = Path(job_dir) / STOPPING
    while mark.exists():
        try:
            old = mark.read_text().strip()
        except FileNotFoundError:
            return
        if old and not _alive(old) and not _group_alive(_pid(old)):
            mark.unlink(missing_ok=True)
            return
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is still in process group `pgid`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _start_time(pid: int) -> str:
    fields = _stat(pid)
    return fields[19] if fields else "0"  # starttime, in clock ticks since boot


def _pid(ref: str) -> int:
    return int(ref.split(":")[0])


def _alive(ref: str) -> bool:
    """Whether the runner of `ref` ("PID:STARTTIME", or a bare PID from before) still runs."""
    pid, _, started = ref.partition(":")
    fields = _stat(int(pid))
    if fields is None or fields[0] == "Z":  # a zombie has ended
        return False
    return not started or fields[19] == started  # else the pid now names another process


def _run(job_dir: str, cmd: list[str]) -> int:
    """The runner: wait until a preempted run of this job dir is gone, start the job, forward
    SIGTERM to it, write its exit code atomically."""
    _wait_for_stopper(job_dir)  # a SIGTERM meanwhile ends the runner: nothing started yet
    proc = subprocess.Popen(cmd)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    code = proc.wait()
    me = os.getpid()
    write_atomic(Path(job_dir) / "exit_code", f"{code} {me}:{_start_time(me)}")  # the ref submit returned for this runner
    return code


if __name__ == "__main__":
    if sys.argv[1] == "--stop":
        _stop(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        sys.exit(0)
    if sys.argv[1] == "--kill-after":
        _kill_after(sys.argv[2], float(sys.argv[3]))
        sys.exit(0)
    split = sys.argv.index("--")
    sys.exit(_run(sys.argv[1], sys.argv[split + 1 :]))
