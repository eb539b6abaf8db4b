"""A real one-node Slurm for the tests: munged, slurmctld and slurmd started in a temp folder.

Debian's ``slurm-wlm`` and ``munge`` (``make slurm-deps``) provide the daemons. Each runs in
the foreground as a child of the test process, with its own socket, state and log files
under the folder and a generated ``slurm.conf`` that ``SLURM_CONF`` points at, so nothing of
the machine's own configuration is read or changed; :meth:`SlurmCluster.stop` ends them by
PID. Starting takes a few seconds (the node registering with the controller). Job credentials
live 10 s (``cred_expire``), which is also how long Slurm holds a requeued job back (120 s by
default): a requeued test job starts again by itself, and never with its old credential.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = (
    "munged",
    "slurmctld",
    "slurmd",
    "sbatch",
    "squeue",
    "sinfo",
    "scancel",
    "scontrol",
    "srun",
)
PARTITION = "debug"

CONF = """\
ClusterName=dmlkit-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
KillWait=5
MinJobAge=600
NodeName={host} CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def missing_programs() -> list[str]:
    """The Slurm/munge programs not on PATH (also looked up in /usr/sbin)."""
    return [name for name in DAEMONS if _which(name) is None]


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd on this machine; ``env`` is what Slurm commands need."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[subprocess.Popen] = []
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout_s: float = 60.0) -> None:
        folder = self.folder
        for sub in ("state", "spool"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        key = folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(
            CONF.format(
                host=host,
                folder=folder,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
                cpus=os.cpu_count() or 1,
                partition=PARTITION,
            )
        )
        munge = [
            _which("munged"), "--foreground", "--force", f"--socket={folder}/munge.socket",
            f"--key-file={key}", f"--pid-file={folder}/munged.pid",
            f"--log-file={folder}/munged.log", f"--seed-file={folder}/munged.seed",
        ]  # fmt: skip
        self._spawn(munge, "munged")
        self._wait(lambda: (folder / "munge.socket").exists(), timeout_s, "munged's socket")
        self._spawn([_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._spawn([_which("slurmd"), "-D", "-f", str(self.conf)], "slurmd")
        self._wait(self._node_idle, timeout_s, "the node to register as idle")

    def _spawn(self, command: list, name: str) -> None:
        log = open(self.folder / f"{name}.out", "wb")  # noqa: SIM115 - kept for the daemon's life
        self.procs.append(
            subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        )

    def _node_idle(self) -> bool:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}); see {self.folder}")
        done = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True, timeout=20
        )
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Slurm test cluster: waited {timeout_s:g} s for {what}")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM each daemon this object started (slurmd first), by PID; SIGKILL after 10 s."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
