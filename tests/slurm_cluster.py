"""A throw-away one-node Slurm for tests: munged, slurmctld and slurmd in a temporary folder.

    from slurm_cluster import slurm   # a session-scoped pytest fixture, yields a Cluster

Everything the daemons write (key, state, spool, logs, pid files) lies in the folder; nothing under
/etc is read or changed, and the ports are free ones picked at start, so two test runs on one
machine do not collide. The commands find this cluster through SLURM_CONF (Cluster.env).
Tests that use the fixture skip, with one line saying why, where the Slurm and MUNGE daemons are
not installed (Debian: apt-get install slurmd slurmctld munge; .ci/run does it) or we are not root.

By hand, to try a job script against it:  python tests/slurm_cluster.py  (Ctrl-C stops it).
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "sinfo", "squeue", "scancel")
START_TIMEOUT = 60  # seconds for the node to come up idle
SEARCH = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin:/usr/local/sbin"


def missing_programs():
    return [p for p in DAEMONS + CLIENTS if not shutil.which(p, path=SEARCH)]


def skip_reason():
    """Why the Slurm tests cannot run here, or None."""
    miss = missing_programs()
    if miss:
        return f"Slurm not installed ({', '.join(miss)} missing; Debian: apt-get install slurmd slurmctld munge)"
    if os.geteuid() != 0:
        return "the test Slurm runs its daemons as root (slurmd starts the job steps); not root"
    return None


def host_cpus():
    # Not nproc: it honours OMP_NUM_THREADS, and the node must declare the cores it really has.
    return os.cpu_count() or 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root, host, cpus, munge_socket, ctld_port, slurmd_port):
    """The text of a slurm.conf for one node, everything kept under `root`."""
    j = lambda name: os.path.join(root, name)  # noqa: E731
    return "\n".join([
        "ClusterName=ringattn-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={j('state')}",
        f"SlurmdSpoolDir={j('spool')}",
        f"SlurmctldPidFile={j('slurmctld.pid')}",
        f"SlurmdPidFile={j('slurmd.pid')}",
        f"SlurmctldLogFile={j('slurmctld.log')}",
        f"SlurmdLogFile={j('slurmd.log')}",
        f"PlugStackConfig={j('plugstack.conf')}",
        "ProctrackType=proctrack/linuxproc",
        # task/affinity (sched_setaffinity, no cgroups) binds each task to its cores as sites do, so
        # the scripts' srun --cpu-bind=cores and OpenMP pinning run as there; with task/none every
        # rank would be pinned to the first core.
        "TaskPlugin=task/affinity",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        "SchedulerType=sched/builtin",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        # the node declares only its CPU count; take it as given instead of draining on topology
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        # sbatch --wait polls every 2 s while MinJobAge stays below 8 s (it backs off beyond)
        "MinJobAge=5",
        "KillWait=2",
        "InactiveLimit=0",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE",
        "",
    ])


class Cluster:
    """The daemons of one test Slurm, started in `root`; stop() ends them and whatever they started."""

    def __init__(self, root):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.cpus = host_cpus()
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        for k in list(self.env):  # a surrounding Slurm job's settings would leak into ours
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del self.env[k]
        self.procs = []

    def log(self, name, tail=3000):
        try:
            with open(os.path.join(self.root, name), errors="replace") as f:
                return f.read()[-tail:]
        except OSError:
            return ""

    def logs(self):
        return "".join(f"\n--- {n}:\n{self.log(n)}" for n in ("munged.log", "slurmctld.log", "slurmd.log"))

    def _spawn(self, name, cmd):
        out = open(os.path.join(self.root, name + ".out"), "w")
        p = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def start(self):
        host = socket.gethostname().split(".")[0]
        for d in ("state", "spool"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        key = os.path.join(self.root, "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(os.urandom(1024))
        sock = os.path.join(self.root, "munge.socket")
        open(os.path.join(self.root, "plugstack.conf"), "w").close()
        with open(self.conf, "w") as f:
            f.write(slurm_conf(self.root, host, self.cpus, sock, _free_port(), _free_port()))
        which = lambda p: shutil.which(p, path=SEARCH)  # noqa: E731
        # --force: munged refuses a key or socket below /tmp (world-writable parents) without it
        self._spawn("munged", [which("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
                               f"--pid-file={os.path.join(self.root, 'munged.pid')}",
                               f"--log-file={os.path.join(self.root, 'munged.log')}",
                               f"--seed-file={os.path.join(self.root, 'munged.seed')}"])
        self._wait(lambda: os.path.exists(sock), "munged to open its socket", 10)
        self._spawn("slurmctld", [which("slurmctld"), "-D", "-c", "-f", self.conf])
        self._spawn("slurmd", [which("slurmd"), "-D", "-f", self.conf])
        self._wait(self._idle, "the node to be idle in sinfo", START_TIMEOUT)

    def _idle(self):
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True,
                           timeout=10)
        return r.returncode == 0 and r.stdout.split() == ["idle"]

    def _wait(self, ready, what, timeout):
        t_end = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > t_end:
                why = f"{', '.join(dead)} exited" if dead else f"not within {timeout} s"
                raise RuntimeError(f"test Slurm: waiting for {what}: {why}{self.logs()}")
            time.sleep(0.2)

    def sbatch(self, args, cwd, timeout, env=None):
        """`sbatch --wait ARGS` in cwd; the CompletedProcess. On timeout the job is cancelled and the test fails."""
        e = dict(self.env, **(env or {}))
        cmd = ["sbatch", "--wait", *[str(a) for a in args]]
        try:
            return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            subprocess.run(["scancel", "--user", "root"], env=self.env, timeout=10)
            pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s{self.logs()}")

    def stop(self):
        try:
            subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            pass
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # Job steps (slurmstepd and the tasks it started) outlive slurmd; they alone carry our SLURM_CONF.
        for pid in _pids_with_env(f"SLURM_CONF={self.conf}"):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _pids_with_env(entry):
    mine, found = os.getpid(), []
    needle = entry.encode() + b"\0"
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == mine:
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle in f.read() + b"\0":
                    found.append(int(d))
        except OSError:
            continue
    return found


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


if __name__ == "__main__":
    import tempfile
    reason = skip_reason()
    if reason:
        sys.exit(reason)
    c = Cluster(tempfile.mkdtemp(prefix="ringattn-slurm-"))
    try:
        c.start()
        print(f"test Slurm up: export SLURM_CONF={c.conf}   (Ctrl-C stops it)", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
