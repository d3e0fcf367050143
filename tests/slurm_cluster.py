"""A real one-node Slurm cluster (Debian's slurm-wlm 22.05 + munge) on localhost, in a temp dir.
Started and stopped by the tests; every daemon is stopped by its PID."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]


def ensure_installed() -> str | None:
    """None when slurmctld/slurmd/munged are available (installing them as root), else the reason."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and cannot be (needs root and apt-get: apt-get install slurm-wlm munge)"
    proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], capture_output=True, text=True,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True)
        proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], capture_output=True, text=True,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return None if proc.returncode == 0 else f"apt-get install slurm-wlm munge failed: {proc.stderr.strip()[-300:]}"


class LocalSlurm:
    def __init__(self, root: Path, cpus: int | None = None):
        self.root, self.cpus = root, cpus or os.cpu_count() or 1
        self.pids: list[int] = []
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o755)  # munged refuses a socket directory others cannot reach
        # cred_expire=10: a requeued job may start again after 10 s instead of the default 120 (5 works
        # too, with less room for a loaded machine's job launch); sched_interval=1: the main scheduling
        # loop, the one that starts a requeued job once eligible, runs every second, not every 60 (the
        # requeued job waited 15 and 46 s for it, now 11; backfill runs only on a change of state)
        self.conf.write_text(f"""ClusterName=local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
SchedulerParameters=batch_sched_delay=0,sched_interval=1
ReturnToService=2
MpiDefault=none
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def _pid(self, path: Path, timeout: float = 10) -> int:
        end = time.time() + timeout
        while time.time() < end:
            if path.is_file() and path.read_text().strip():
                return int(path.read_text().split()[0])
            time.sleep(0.1)
        raise RuntimeError(f"daemon did not write {path}")

    def start(self) -> "LocalSlurm":
        r = self.root
        self._write_conf()
        key = r / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o400)
        subprocess.run(["munged", f"--socket={r}/munge/munge.socket", f"--key-file={key}", f"--pid-file={r}/munge/munged.pid",
                        f"--log-file={r}/munge/munged.log", f"--seed-file={r}/munge/munged.seed", "--force"],
                       check=True, capture_output=True)
        self.pids.append(self._pid(r / "munge" / "munged.pid"))
        subprocess.run(["slurmctld", "-i"], env=self.env, check=True, capture_output=True)
        self.pids.append(self._pid(r / "slurmctld.pid"))
        subprocess.run(["slurmd", "-N", "localhost"], env=self.env, check=True, capture_output=True)
        self.pids.append(self._pid(r / "slurmd.pid"))
        end = time.time() + 30
        while time.time() < end:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.3)
        raise RuntimeError(f"node not idle after 30 s (state {state!r}); see {r / 'log'}")

    def stop(self) -> None:
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in self.pids:
            end = time.time() + 10
            while time.time() < end:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        self.pids.clear()

    # ---- client side ----
    def run(self, *cmd: str, cwd: Path | None = None, env: dict | None = None) -> str:
        proc = subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True, text=True, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def jobs(self, job_id: str) -> dict[str, str]:
        """{array task id or job id: state} of a job still known to slurmctld."""
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i %T", "--states=all"], env=self.env,
                             capture_output=True, text=True).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def wait_done(self, job_id: str, timeout: float) -> dict[str, str]:
        """Poll until no task of the job is pending or running; returns {task: final state}."""
        end, states = time.time() + timeout, {}
        while time.time() < end:
            out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True, text=True).stdout
            states = {}
            for line in out.splitlines():
                fields = dict(t.split("=", 1) for t in line.split() if "=" in t)
                states[fields.get("JobId", "?")] = fields.get("JobState", "?")
            if states and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") for s in states.values()):
                return states
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not done after {timeout} s: {states}")
