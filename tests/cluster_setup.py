"""Simulated clusters for the launcher tests: a one-node SLURM cluster (munged, slurmctld, slurmd)
and two "nodes" that are network namespaces with an sshd each. Root only; the Debian packages are
installed on first use. Everything started here is stopped by its pid (from its pid file) and
every namespace and link is deleted in `stop()`, which is safe to call after a partial start."""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

_apt_updated = False


def unavailable(reason: str) -> None:
    """Skip, except in CI (root, registries reachable) where these tests must run."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: launcher tests must run here)")
    pytest.skip(reason)


def sh(*command: str, timeout: float = 60, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done


MPI_PACKAGES = {"mpirun": "openmpi-bin", "ompi_info": "openmpi-bin"}


def _missing(binaries: dict[str, str]) -> set[str]:
    return {pkg for binary, pkg in binaries.items()
            if not (os.path.exists(binary) if binary.startswith("/") else shutil.which(binary))}


def need_packages(binaries: dict[str, str]) -> None:
    """Make sure each binary (path or name) exists, installing its Debian package (as root) if not.
    The first install also brings every other launcher test's packages (one apt run, not three)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root (starts daemons, network namespaces, installs Debian packages)")
    if not _missing(binaries):
        return
    missing = sorted(_missing({**SlurmCluster.PACKAGES, **SshNodes.PACKAGES, **MPI_PACKAGES, **binaries}))
    if not shutil.which("apt-get"):
        unavailable(f"needs Debian packages {', '.join(missing)} and there is no apt-get")
    global _apt_updated
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if not _apt_updated:
            sh("apt-get", "update", "-qq", timeout=300, env=env)
            _apt_updated = True
        sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, timeout=600, env=env)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        unavailable(f"could not install {', '.join(missing)}: {str(error)[-500:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def kill_pidfile(path: Path, timeout: float = 10) -> None:
    """Stop the daemon whose pid file we wrote (TERM, then KILL)."""
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


class SlurmCluster:
    """munged + slurmctld + slurmd on this host, all state under one temp directory."""

    PACKAGES = {"/usr/sbin/slurmctld": "slurmctld", "/usr/sbin/slurmd": "slurmd", "sbatch": "slurm-client",
                "/usr/sbin/munged": "munge"}

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mgpt-slurm-"))
        self.dir.chmod(0o755)  # munged (user munge) must reach its socket directory
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> "SlurmCluster":
        munge = self.dir / "munge"
        munge.mkdir()
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        shutil.chown(munge, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        munge.chmod(0o711)
        self.socket = munge / "munge.socket"
        sh("runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={self.socket}", f"--key-file={key}",
           f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
           f"--seed-file={munge / 'munged.seed'}")
        node = socket.gethostname().split(".")[0]
        cpus = max(2, os.cpu_count() or 1)
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir()
        self.conf.write_text(f"""\
ClusterName=mgpt
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={self.dir / 'state'}
SlurmdSpoolDir={self.dir / 'spool'}
SlurmctldPidFile={self.dir / 'slurmctld.pid'}
SlurmdPidFile={self.dir / 'slurmd.pid'}
SlurmctldLogFile={self.dir / 'slurmctld.log'}
SlurmdLogFile={self.dir / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
KillWait=30
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        sh("/usr/sbin/slurmctld", "-f", str(self.conf), env=self.env)
        sh("/usr/sbin/slurmd", "-f", str(self.conf), env=self.env)
        wait_for(lambda: "idle" in sh("sinfo", "-h", "-o", "%T", check=False, env=self.env).stdout, 60,
                 "the SLURM node to be idle")
        return self

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.dir.glob("*.log")))

    def stop(self) -> None:
        if self.conf.exists():
            sh("scancel", "--full", "--user=root", check=False, env=self.env, timeout=30)
        for pidfile in (self.dir / "slurmd.pid", self.dir / "slurmctld.pid", self.dir / "munge" / "munged.pid"):
            kill_pidfile(pidfile)
        shutil.rmtree(self.dir, ignore_errors=True)


class SshNodes:
    """Two network namespaces on a bridge, each with its own IP and an sshd; `ssh`/pdsh reach them
    through an ssh wrapper (first on PATH) that uses this cluster's key and ignores host keys."""

    PACKAGES = {"pdsh": "pdsh", "/usr/sbin/sshd": "openssh-server", "ssh": "openssh-client", "ip": "iproute2"}
    IFNAME = "mg0"  # the same name in every namespace: GLOO_SOCKET_IFNAME=mg0 works on each node

    def __init__(self, count: int = 2) -> None:
        self.tag = f"{os.getpid() % 100000}{random.randint(10, 99)}"
        self.dir = Path(tempfile.mkdtemp(prefix="mgpt-ssh-"))
        self.namespaces = [f"mgpt{self.tag}{chr(97 + i)}" for i in range(count)]
        self.bridge = f"mgbr{self.tag}"
        self.links: list[str] = []
        self.addresses: list[str] = []
        self.bin = self.dir / "bin"

    def _subnet(self) -> ipaddress.IPv4Network:
        used = sh("ip", "-4", "-o", "addr", "show", check=False).stdout + sh("ip", "-4", "route", check=False).stdout
        for _ in range(200):
            net = ipaddress.IPv4Network(f"192.168.{random.randint(100, 250)}.0/24")
            if f"192.168.{net.network_address.packed[2]}." not in used:
                return net
        raise RuntimeError("no free 192.168.x.0/24 subnet for the test nodes")

    def start(self) -> "SshNodes":
        net = self._subnet()
        hosts = list(net.hosts())
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{hosts[0]}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i, ns in enumerate(self.namespaces):
            sh("ip", "netns", "add", ns)
            link = f"mg{self.tag}{chr(97 + i)}"
            sh("ip", "link", "add", link, "type", "veth", "peer", "name", self.IFNAME, "netns", ns)
            self.links.append(link)
            sh("ip", "link", "set", link, "master", self.bridge)
            sh("ip", "link", "set", link, "up")
            address = str(hosts[i + 1])
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{address}/24", "dev", self.IFNAME)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", self.IFNAME, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            self.addresses.append(address)
        d = self.dir
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key"))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "id_ed25519"))
        shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
        (d / "sshd_config").write_text(
            f"Port 22\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPrintMotd no\n")
        (d / "ssh_config").write_text(
            f"Host *\n  IdentityFile {d / 'id_ed25519'}\n  IdentitiesOnly yes\n  UserKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking no\n  BatchMode yes\n  LogLevel ERROR\n  ConnectTimeout 10\n")
        self.bin.mkdir()
        wrapper = self.bin / "ssh"  # DeepSpeed runs plain `ssh HOST hostname`; pdsh runs `ssh` too
        wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {d / 'ssh_config'} \"$@\"\n")
        wrapper.chmod(0o755)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
        for ns, address in zip(self.namespaces, self.addresses):
            sh("ip", "netns", "exec", ns, shutil.which("sshd") or "/usr/sbin/sshd", "-f", str(d / "sshd_config"),
               "-o", f"ListenAddress={address}", "-o", f"PidFile={d / (ns + '.pid')}", "-E", str(d / (ns + '.log')))
        self.env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}
        for address in self.addresses:
            wait_for(lambda: sh("ssh", address, "true", check=False, env=self.env, timeout=20).returncode == 0,
                     30, f"sshd on {address}", interval=0.5)
        return self

    def hostfile(self, slots: int = 1) -> Path:
        path = self.dir / "hostfile"
        path.write_text("".join(f"{a} slots={slots}\n" for a in self.addresses))
        return path

    def stop(self) -> None:
        for ns in self.namespaces:
            kill_pidfile(self.dir / f"{ns}.pid")
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():  # started by us in our namespace
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
        for link in self.links:
            sh("ip", "link", "del", link, check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
