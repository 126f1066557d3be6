"""A throwaway one-node Slurm cluster for the launch tests, started and stopped by the test session.

    cluster = SlurmCluster.start(workdir)   # or SlurmCluster.reuse() for one already running
    job = cluster.sbatch("launch/slurm/train.sbatch", "-N1", "-n1", env={...})
    cluster.stop()

Nothing of it lives in /etc: munged runs on its own key and socket, slurmctld and slurmd on a
slurm.conf, ports, state and spool directories inside `workdir`, and every client command gets
SLURM_CONF from `cluster.env`. A cluster already running on this host (sinfo works and lists this
host as a node) is reused and left alone. Installation (apt-get, as root, on Debian/Ubuntu) is
done by `install_slurm` when sbatch is missing; the caller skips when it returns a reason.
"""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}
# Keep package scripts from starting the distribution's services (standard Debian hook).
NO_SERVICE_STARTS = "#!/bin/sh\n# tests/launch/slurm_cluster.py, during apt-get only\nexit 101\n"


def _say(text: str) -> None:
    print(f"[slurm-cluster] {text}", flush=True)


def _missing_tools() -> list[str]:
    return [
        tool
        for tool in ("sbatch", "scontrol", "slurmctld", "slurmd", "munged")
        if shutil.which(tool) is None
    ]


def _apt(*args: str, timeout: int) -> subprocess.CompletedProcess:
    command = [
        "apt-get",
        "-q",
        "-y",
        "-o",
        "DPkg::Lock::Timeout=120",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
        *args,
    ]
    _say("$ " + " ".join(command))
    return subprocess.run(
        command, env={**os.environ, **APT_ENV}, capture_output=True, text=True, timeout=timeout
    )


def install_slurm() -> str | None:
    """Install Slurm and munge with apt-get when they are missing; the reason when that is not
    possible (then the caller skips), else None."""
    if not _missing_tools():
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed ({', '.join(_missing_tools())} missing) and not root"
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and this host has no apt-get to install it with"
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text(NO_SERVICE_STARTS)
        policy.chmod(0o755)
    started = time.monotonic()
    try:
        for attempt in (1, 2):
            update = _apt("update", timeout=300)
            install = _apt("install", "--no-install-recommends", *PACKAGES, timeout=900)
            if install.returncode == 0:
                break
            _say(
                f"apt-get attempt {attempt} failed:\n{update.stderr[-1500:]}"
                f"{install.stdout[-1500:]}{install.stderr[-1500:]}"
            )
        else:
            return f"apt-get install {' '.join(PACKAGES)} failed twice (see the output above)"
    except subprocess.TimeoutExpired as err:
        return f"apt-get timed out: {err}"
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
    _say(f"installed {' '.join(PACKAGES)} in {time.monotonic() - started:.0f} s")
    missing = _missing_tools()
    return f"apt-get installed Slurm but {missing} are still missing" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    """RealMemory for slurm.conf: 90% of MemTotal, so slurmd never finds less than configured."""
    text = Path("/proc/meminfo").read_text()
    kib = int(re.search(r"^MemTotal:\s+(\d+) kB", text, re.MULTILINE).group(1))
    return int(kib * 0.9) // 1024


def slurm_conf(root: Path, host: str, ctld_port: int, slurmd_port: int) -> str:
    """A single-host cluster: one node with 2 CPUs, one partition, requeue allowed, no cgroups
    (proctrack/linuxproc signals a step's whole process tree), no accounting. cred_expire is
    also how long a requeued job waits before it may start again (default 120 s)."""
    return f"""\
ClusterName=attnres-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=60
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    env: dict[str, str]  # the environment every client command (and job) runs with
    host: str
    root: Path | None = None  # None: a cluster this session did not start (reused, left alone)
    pids: dict[str, int] = field(default_factory=dict)

    # ---- client commands ----

    def command(
        self,
        *args: str,
        timeout: float = 30,
        check: bool = True,
        env: dict | None = None,
        cwd: Path | None = None,
    ) -> str:
        done = subprocess.run(
            args,
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done.stdout

    def sbatch(
        self, script: str, *options: str, env: dict | None = None, cwd: Path | None = None
    ) -> int:
        out = self.command("sbatch", "--parsable", *options, script, env=env, cwd=cwd)
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str] | None:
        """`scontrol show job` as a dict (JobState, Restarts, ...); None once Slurm has forgotten
        the finished job (MinJobAge). Other failures raise RuntimeError."""
        done = subprocess.run(
            ["scontrol", "-o", "show", "job", str(job_id)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if "Invalid job id" in done.stderr:
            return None
        if done.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id} failed: {done.stderr.strip()}")
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout))

    def idle(self) -> bool:
        done = subprocess.run(
            ["sinfo", "-h", "-N", "-n", self.host, "-o", "%t"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return done.returncode == 0 and done.stdout.strip() in ("idle", "mix")

    def logs(self) -> str:
        if self.root is None:
            return "(reused cluster: its daemon logs are wherever its slurm.conf says)"
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {path.name} (tail) ---\n" + path.read_text()[-3000:])
        return "\n".join(parts)

    # ---- life cycle ----

    @classmethod
    def reuse(cls) -> "SlurmCluster | None":
        """The cluster already running on this host, when sinfo answers and lists this host."""
        if subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode != 0:
            return None
        host = socket.gethostname().split(".")[0]
        cluster = cls(env=dict(os.environ), host=host)
        try:
            if cluster.idle():
                _say(f"reusing the running Slurm cluster (node {host})")
                return cluster
        except (OSError, subprocess.TimeoutExpired):
            pass
        return None

    @classmethod
    def start(cls, root: Path, timeout: float = 60) -> "SlurmCluster":
        """munged, slurmctld and slurmd as root daemons on a private config under ROOT."""
        host = socket.gethostname().split(".")[0]
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)  # munged refuses group/world-writable directories
        (root / "munge").chmod(0o700)
        conf = root / "slurm.conf"
        conf.write_text(slurm_conf(root, host, _free_port(), _free_port()))
        env = {**os.environ, "SLURM_CONF": str(conf)}
        env.pop("SLURM_JOB_ID", None)  # not inside another job's allocation
        cluster = cls(env=env, host=host, root=root)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))  # what mungekey writes; old munge versions lack it
        key.chmod(0o600)
        cluster._daemon(
            "munged",
            f"--key-file={key}",
            f"--socket={root}/munge/munge.socket",
            f"--pid-file={root}/munge/munged.pid",
            f"--log-file={root}/log/munged.log",
            f"--seed-file={root}/munge/munged.seed",
            "--force",
        )
        cluster._wait_pid("munged", root / "munge" / "munged.pid", timeout)
        cluster._daemon("slurmctld", "-f", str(conf))
        cluster._wait_pid("slurmctld", root / "slurmctld.pid", timeout)
        cluster._daemon("slurmd", "-f", str(conf), "-N", host)
        cluster._wait_pid("slurmd", root / "slurmd.pid", timeout)
        deadline = time.monotonic() + timeout
        while not cluster.idle():
            if time.monotonic() > deadline:
                logs = cluster.logs()
                cluster.stop()
                raise RuntimeError(f"node {host} not idle after {timeout:.0f} s\n{logs}")
            time.sleep(1)
        _say(f"cluster up under {root} (node {host}, SLURM_CONF={conf})")
        return cluster

    def _daemon(self, *command: str) -> None:
        """Run a daemon's start command (it forks into the background and writes its pid file)."""
        _say("$ " + " ".join(command))
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(
                f"{command[0]} failed ({done.returncode}): {done.stderr}\n{self.logs()}"
            )

    def _wait_pid(self, name: str, pid_file: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = pid_file.read_text().strip() if pid_file.exists() else ""
            if text.isdigit() and Path(f"/proc/{text}").exists():
                self.pids[name] = int(text)
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"{name} wrote no live pid to {pid_file} in {timeout:.0f} s\n{self.logs()}"
        )

    def stop(self, timeout: float = 60) -> None:
        """Cancel what is left of the jobs, stop slurmd, slurmctld and munged, then end any
        step daemon (and its process tree) still holding this cluster's spool directory."""
        if self.root is None:
            return
        if "slurmctld" in self.pids:
            self._cancel_jobs(timeout)
        for name in ("slurmd", "slurmctld", "munged"):
            if name in self.pids:
                _terminate([self.pids.pop(name)], timeout=15)
        strays = _processes_using(self.root)
        if strays:
            _say(f"ending stray processes of this cluster: {strays}")
            _terminate(strays, timeout=15)
        _say("cluster stopped")

    def _cancel_jobs(self, timeout: float) -> None:
        try:
            self.command("scancel", "--user", "root", check=False)
            deadline = time.monotonic() + timeout
            while self.command("squeue", "-h", "-o", "%i", check=False).strip():
                if time.monotonic() > deadline:
                    _say("jobs still listed after scancel; stopping the daemons anyway")
                    return
                time.sleep(1)
        except (OSError, subprocess.TimeoutExpired) as err:
            _say(f"could not cancel the remaining jobs: {err}")


def _descendants(pids: list[int]) -> list[int]:
    """PIDS and every process below them (by parent pid), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _processes_using(root: Path) -> list[int]:
    """Slurm step daemons whose open files or working directory lie under ROOT."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if not proc.joinpath("cmdline").read_bytes().startswith(b"slurmstepd"):
                continue
            links = [proc / "cwd", *proc.joinpath("fd").iterdir()]
            if any(str(os.readlink(link)).startswith(str(root)) for link in links):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _terminate(pids: list[int], timeout: float) -> None:
    """SIGTERM to PIDS and their process trees, SIGKILL to what is left after TIMEOUT."""
    tree = _descendants(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not any(_alive(pid) for pid in tree):
            return


def _alive(pid: int) -> bool:
    """Running and not a zombie waiting for its parent."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
