"""A real Slurm 22.05 (Debian's slurm-wlm) emulating several nodes on this host, for tests.

One slurmctld and one `slurmd -N nodeK` per node, all on private high ports with a private
state directory, `topology/tree` leaf and spine switches, and fake GPUs: gres.conf `File=`
lines pointing at placeholder files.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def unavailable_reason() -> str | None:
    for binary in ("slurmctld", "slurmd", "scontrol", "sbatch"):
        if shutil.which(binary) is None:
            return f"{binary} not installed (run scripts/install-system-packages.sh as root to get Debian's slurm-wlm)"
    if os.geteuid() != 0:
        return "the emulated Slurm cluster needs root (slurmd runs jobs as their user)"
    return None


def _free_port_block(count: int) -> int:
    """A base port with `count` consecutive free ports (high range, away from common services)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65000:
            continue
        try:
            socks = []
            for p in range(base, base + count):
                sk = socket.socket()
                sk.bind(("127.0.0.1", p))
                socks.append(sk)
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise RuntimeError("no block of free ports")


@dataclass
class EmulatedSlurm:
    root: Path
    nodes: int = 4
    gpus_per_node: int = 2
    nodes_per_leaf: int = 2
    procs: dict = field(default_factory=dict)  # name -> Popen
    # slurmstepd makes Unix sockets in the spool dir, whose paths may not pass 108 bytes: a test's
    # tmp_path under xdist (.../popen-gw1/test_.../slurm/spool/node1/node1_1.4294967291) is too
    # long, and the job step then dies at launch. So the spool lives in a short folder of its own.
    spool: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="scslurm-", dir="/tmp")))

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def write_config(self) -> None:
        base = _free_port_block(self.nodes + 2)
        r = self.root
        for d in ("state", "log", "dev"):
            (r / d).mkdir(parents=True, exist_ok=True)
        gres = []
        for name in self.node_names():
            for g in range(self.gpus_per_node):
                (r / "dev" / f"{name}-gpu{g}").touch()  # placeholder "device" files
            gres.append(f"NodeName={name} Name=gpu File={r}/dev/{name}-gpu[0-{self.gpus_per_node - 1}]")
        (r / "gres.conf").write_text("AutoDetect=off\n" + "\n".join(gres) + "\n")
        leaves = [self.node_names()[i : i + self.nodes_per_leaf] for i in range(0, self.nodes, self.nodes_per_leaf)]
        topo = [f"SwitchName=leaf{i + 1} Nodes={','.join(ns)}" for i, ns in enumerate(leaves)]
        topo.append(f"SwitchName=spine1 Switches={','.join(f'leaf{i + 1}' for i in range(len(leaves)))}")
        (r / "topology.conf").write_text("\n".join(topo) + "\n")
        self.conf.write_text(f"""\
ClusterName=sctest
SlurmctldHost=localhost
SlurmctldPort={base}
SlurmdPort={base + 1}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={self.spool}/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
TopologyPlugin=topology/tree
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=10
SlurmctldTimeout=30
MessageTimeout=5
KillWait=3
MinJobAge=3600
InactiveLimit=0
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName={self._nodelist()} NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{base + 2}-{base + 1 + self.nodes}] CPUs=4 RealMemory=2000 Gres=gpu:{self.gpus_per_node} State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def _nodelist(self) -> str:
        return f"node[1-{self.nodes}]"

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        log = open(self.root / "log" / "daemons.out", "ab")
        self.procs["slurmctld"] = subprocess.Popen(["slurmctld", "-D", "-c", "-f", str(self.conf)], env=self.env,
                                                   stdout=log, stderr=subprocess.STDOUT)
        for name in self.node_names():
            self.start_node(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.node_states()
            if len(states) == self.nodes and all(s.startswith("idle") for s in states.values()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"emulated Slurm did not come up: {self.node_states()}\n{self.tail_logs()}")

    def start_node(self, name: str) -> None:
        log = open(self.root / "log" / "daemons.out", "ab")
        self.procs[name] = subprocess.Popen(["slurmd", "-D", "-N", name, "-f", str(self.conf)], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT)

    def node_states(self) -> dict[str, str]:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
        return dict(line.split() for line in out.stdout.splitlines() if line.strip())

    def kill_node(self, name: str) -> None:
        """The node dies: its slurmd and every process it started (slurmstepd and job tasks)."""
        victims = {self.procs[name].pid}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            # this cluster's node only: another emulated cluster (a test beside this one) has a node1 too
            if f"SLURMD_NODENAME={name}".encode() in environ and f"SLURM_CONF={self.conf}".encode() in environ:
                victims.add(int(proc.name))
                try:  # its slurmstepd parent, too
                    ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    if "slurmstepd" in Path(f"/proc/{ppid}/cmdline").read_text():
                        victims.add(ppid)
                except (OSError, ValueError):
                    pass
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs[name].wait()

    def tail_logs(self, lines: int = 30) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            out.append(f"== {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True, timeout=10)
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        # Job processes outlive slurmd when it is killed; end the ones this cluster started.
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) not in (os.getpid(), os.getppid()):
                try:
                    if f"SLURM_CONF={self.conf}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                        os.kill(int(proc.name), signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(self.spool, ignore_errors=True)


if __name__ == "__main__":
    # A dev cluster by hand: `python tests/slurm_emulator.py /tmp/slurm`, then in another shell
    # `export SLURM_CONF=/tmp/slurm/slurm.conf; supercluster fleet init --backend slurm`.
    import sys

    emu = EmulatedSlurm(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/supercluster-slurm"))
    reason = unavailable_reason()
    if reason:
        sys.exit(f"cannot start Slurm: {reason}")
    emu.start()
    print(f"Slurm up: export SLURM_CONF={emu.conf}  (Ctrl-C stops it)", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
