"""Per-rank discovery, run by the rank entry point before it joins the process group: turn what
srun or mpirun put in the environment into torch's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT. torchrun and DeepSpeed's launcher already set those, and are left alone."""

from __future__ import annotations

import fcntl
import re
import socket
import struct
import subprocess
from typing import Mapping, MutableMapping

MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def source(environ: Mapping[str, str]) -> str:
    """Who started this process: env (torchrun/DeepSpeed), mpi, slurm (an srun task), or single."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return "env"
    if "OMPI_COMM_WORLD_SIZE" in environ or "MV2_COMM_WORLD_SIZE" in environ:
        return "mpi"
    in_step = "SLURM_PROCID" in environ and ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ)
    if in_step:
        # MPICH's hydra starts its proxies with srun: then PMI's world is not srun's task count.
        step_tasks = environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS"))
        if "PMI_SIZE" in environ and environ["PMI_SIZE"] != step_tasks:
            return "mpi"
        return "slurm"
    if any(name in environ for name in MPI_SIZE_VARS):
        return "mpi"
    return "single"


def first_host(nodelist: str) -> str:
    """First host of a SLURM host list: `gpu[07-09,12],cpu1` -> `gpu07`, `r[1-2]-n[01-04]` -> `r1-n01`."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\],\-]+)[^\]]*\]", r"\1", nodelist[:end].strip())


def tasks_on_node(tasks_per_node: str, node_index: int) -> int:
    """SLURM_STEP_TASKS_PER_NODE (`2(x3),1`) -> the task count of node `node_index`."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            return 1
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_index] if 0 <= node_index < len(counts) else counts[0]


def interface_address(name: str) -> str | None:
    """IPv4 address of a network interface (the one GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME names)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
        return socket.inet_ntoa(packed[20:24])
    except OSError:
        return None


def own_address(environ: Mapping[str, str]) -> str:
    """This host's address for others to reach: the socket interface's, else `hostname -I`'s first."""
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        for name in environ.get(var, "").split(","):
            address = interface_address(name.strip().lstrip("=^")) if name.strip() else None
            if address:
                return address
    try:
        addresses = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
        if addresses:
            return addresses[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def address_towards(host: str, port: int) -> str:
    """The local address this host uses to reach `host` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return "?"


def discover(environ: MutableMapping[str, str], master_addr: str | None = None, master_port: int = 29500) -> str:
    """Fill torch's rendezvous variables in `environ` from SLURM or MPI; returns the source.

    MASTER_ADDR: the environment's, else `master_addr` (launcher.master_addr), else the first
    node of the SLURM node list (srun) or rank 0's own address broadcast over MPI (mpirun).
    """
    how = source(environ)
    port = environ.get("MASTER_PORT", str(master_port))
    if how == "slurm":
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or "1"
        environ.update({
            "RANK": environ["SLURM_PROCID"],
            "WORLD_SIZE": environ.get("SLURM_STEP_NUM_TASKS") or environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(tasks_on_node(per_node, int(environ.get("SLURM_NODEID", "0")))),
            "MASTER_ADDR": environ.get("MASTER_ADDR") or master_addr or first_host(nodelist),
            "MASTER_PORT": port,
        })
    elif how == "mpi":
        from mpi4py import MPI  # initializes MPI; rank 0 shares its address with the others

        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        rank = comm.Get_rank()
        address = environ.get("MASTER_ADDR") or master_addr or (own_address(environ) if rank == 0 else None)
        address, port = comm.bcast((address, port), root=0)
        environ.update({
            "RANK": str(rank), "WORLD_SIZE": str(comm.Get_size()),
            "LOCAL_RANK": str(local.Get_rank()), "LOCAL_WORLD_SIZE": str(local.Get_size()),
            "MASTER_ADDR": address, "MASTER_PORT": str(port),
        })
        local.Free()
    return how
