"""The command each launcher type runs on this host, and what then runs on every node.

local: torchrun. pdsh / openmpi / mvapich: stock DeepSpeed (`python -m deepspeed.launcher.runner`)
over launcher.hostfile. slurm: srun inside an allocation. mpirun: Open MPI's mpirun. Every rank
runs the same entry point, `python -u -m megatron_gpt.training.main CONFIG... --set K=V`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from megatron_gpt.config.schema import Config
from megatron_gpt.launch import environment
from megatron_gpt.parallel.cpu.threads import threads_per_rank

RANK_ENTRY = "megatron_gpt.training.main"
HOSTFILE_TYPES = ("pdsh", "openmpi", "mvapich")


class LaunchError(RuntimeError):
    """A launch that cannot work as configured; the message names the key and the fix."""


@dataclass
class Node:
    """What one node runs, for --dry-run."""

    where: str
    command: str


@dataclass
class Plan:
    """The command to run on this host, the variables to add for it, and per-node commands."""

    kind: str
    command: list[str]
    env: dict[str, str]
    nodes: list[Node]
    summary: str
    env_file: dict[str, str] | None = None   # DeepSpeed's DS_ENV_FILE contents (hostfile types)
    signal_ranks: bool = False                # local: signals go to the ranks, not to torchrun
    notes: list[str] = field(default_factory=list)
    launch_file: LaunchFile | None = None     # what travels off the command line (0600 file)
    unset: list[str] = field(default_factory=list)  # variables kept from DeepSpeed's runner (in launch_file)
    secret_env: list[str] = field(default_factory=list)  # launcher.secret_env, for masking


LAUNCH_VARIABLE = "MEGATRON_GPT_LAUNCH"
"""Where local, slurm and mpirun ranks find the LaunchFile's JSON: the process environment (torchrun,
srun and mpirun -x pass it on), which only the user can read; never a command line."""


@dataclass
class LaunchFile:
    """Overrides and variables that may not travel on a command line (secrets; for DeepSpeed's
    runner also any value a remote shell would reparse). local/slurm/mpirun: in the ranks'
    environment (LAUNCH_VARIABLE). pdsh/openmpi/mvapich (DeepSpeed puts its exports on the
    command line): a 0600 file `path` under each node's home, written through ssh's stdin before
    the runner starts and removed after; ranks read it with training.main --launch-file."""

    path: str
    overrides: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    hosts: list[str] = field(default_factory=list)  # where the file is written (hostfile launchers)

    def __bool__(self) -> bool:
        return bool(self.overrides or self.env)

    def json(self) -> str:
        import json

        return json.dumps({"overrides": self.overrides, "env": self.env})


def launch_file_path() -> str:
    import uuid

    return f"~/.megatron-gpt-launch-{uuid.uuid4().hex[:12]}.json"


def split_overrides(cfg: Config, overrides: list[str], shell_safe: bool) -> tuple[list[str], LaunchFile]:
    """Overrides for the command line, and the rest for the launch file: secrets always; with
    `shell_safe` (a remote shell reparses the line) every value that is not a plain word too."""
    patterns = cfg.launcher.secret_env
    kept = LaunchFile(launch_file_path())
    argv = []
    for override in overrides:
        secret = environment.mask_argument(override, patterns) != override
        if kept.overrides or secret or (shell_safe and not environment.plain_word(override)):
            kept.overrides.append(override)  # and every later one: overrides apply in order
        else:
            argv.append(override)
    return argv, kept


def _plan_with(make):
    """Plans of launchers that start ranks without a shell: secrets off the command line only."""

    def build(cfg: Config, config_files: list[str], overrides: list[str]) -> Plan:
        argv, kept = split_overrides(cfg, overrides, shell_safe=False)
        p = make(cfg, config_files, argv)
        p.launch_file, p.secret_env = (kept or None), list(cfg.launcher.secret_env)
        if kept and p.kind == "mpirun":  # -x NAME: mpirun passes the value from its own environment
            p.command[1:1] = ["-x", LAUNCH_VARIABLE]
        return p

    build.__doc__ = make.__doc__
    return build


def rank_arguments(config_files: list[str], overrides: list[str]) -> list[str]:
    """Config paths and `--set K=V` pairs; a `--launch-file=PATH` entry passes through as is."""
    args = [os.path.abspath(path) for path in config_files]
    for override in overrides:
        args += [override] if override.startswith("--launch-file=") else ["--set", override]
    return args


def rank_command(config_files: list[str], overrides: list[str]) -> list[str]:
    return [sys.executable, "-u", "-m", RANK_ENTRY, *rank_arguments(config_files, overrides)]


def _root_mpi_env() -> dict[str, str]:
    # Open MPI refuses to start as root (containers, CI) unless told it is intended.
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    return {}


def local_plan(cfg: Config, config_files: list[str], overrides: list[str]) -> Plan:
    """torchrun on this host with nproc_per_node ranks (free rendezvous port via --standalone)."""
    la = cfg.launcher
    if la.num_nodes > 1:
        raise LaunchError(f"launcher.num_nodes is {la.num_nodes}, but launcher.type local starts ranks on this host "
                          "only; fix: set launcher.type to pdsh, openmpi, mvapich, slurm or mpirun, or "
                          "launcher.num_nodes to 1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={la.nproc_per_node}",
               "-m", RANK_ENTRY, *rank_arguments(config_files, overrides)]
    threads = threads_per_rank({"LOCAL_WORLD_SIZE": str(la.nproc_per_node)}, la.threads_per_rank)
    env = {"OMP_NUM_THREADS": str(threads), **la.env}
    return Plan("local", command, env, [],
                f"local: torchrun, {la.nproc_per_node} ranks on this host", signal_ranks=True)


def slurm_plan(cfg: Config, config_files: list[str], overrides: list[str]) -> Plan:
    """srun inside the current allocation: one task per rank; ranks read SLURM_PROCID etc."""
    la = cfg.launcher
    command = ["srun", f"--nodes={la.num_nodes}", f"--ntasks={cfg.world_size}",
               f"--ntasks-per-node={la.nproc_per_node}", "--kill-on-bad-exit=1", *_split(la.launcher_args),
               *rank_command(config_files, overrides)]
    env = {**environment.forwarded(la, os.environ), "MASTER_PORT": str(la.master_port)}
    if la.master_addr:
        env["MASTER_ADDR"] = la.master_addr
    if la.threads_per_rank:
        env["OMP_NUM_THREADS"] = str(la.threads_per_rank)
    rank = environment.printable(rank_command(config_files, overrides))
    where = (f"each of {la.num_nodes} node(s) of the allocation, {la.nproc_per_node} task(s) per node "
             "(RANK=SLURM_PROCID, WORLD_SIZE=SLURM_NTASKS, LOCAL_RANK=SLURM_LOCALID, MASTER_ADDR="
             + (la.master_addr or "first node of SLURM_STEP_NODELIST") + ")")
    return Plan("slurm", command, env, [Node(where, rank)],
                f"slurm: srun, {la.num_nodes} node(s) x {la.nproc_per_node} = world size {cfg.world_size}")


def mpirun_plan(cfg: Config, config_files: list[str], overrides: list[str]) -> Plan:
    """Open MPI's mpirun; each rank finds its rank, world size and rank 0's address via mpi4py."""
    la = cfg.launcher
    env = {**environment.forwarded(la, os.environ), "MASTER_PORT": str(la.master_port), **_root_mpi_env()}
    if la.threads_per_rank:
        env["OMP_NUM_THREADS"] = str(la.threads_per_rank)
    command = ["mpirun", "-np", str(cfg.world_size)]
    if la.hostfile:
        command += ["--hostfile", os.path.abspath(la.hostfile)]
    if la.hostfile or la.num_nodes > 1:
        command += ["--npernode", str(la.nproc_per_node)]
    for name in env:  # -x NAME exports the value from mpirun's environment: secrets stay off the command line
        if not name.startswith("OMPI_"):
            command += ["-x", name]
    command += [*_split(la.launcher_args), *rank_command(config_files, overrides)]
    where = (f"{la.num_nodes} node(s) x {la.nproc_per_node} rank(s)"
             + (f" from {la.hostfile}" if la.hostfile else (" of the MPI allocation" if la.num_nodes > 1 else " on this host"))
             + " (ranks via mpi4py)")
    return Plan("mpirun", command, env, [Node(where, environment.printable(rank_command(config_files, overrides)))],
                f"mpirun: {la.num_nodes} node(s) x {la.nproc_per_node} = world size {cfg.world_size}")


def _split(text: str) -> list[str]:
    import shlex

    return shlex.split(text)


def deepspeed_plan(cfg: Config, config_files: list[str], overrides: list[str]) -> Plan:
    """Stock DeepSpeed runner with --launcher pdsh|openmpi|mvapich over the hostfile."""
    from deepspeed.launcher import runner as ds

    la, kind = cfg.launcher, cfg.launcher.type
    hostfile = os.path.abspath(la.hostfile or "")
    if not os.path.isfile(hostfile):
        raise LaunchError(f"launcher.hostfile {la.hostfile}: no such file; fix: write one `HOST slots=N` line "
                          "per node (see launch/hostfile.example)")
    with open(hostfile, encoding="utf-8") as f:
        try:
            pool = ds._parse_hostfile(f.readlines())
        except ValueError as error:
            raise LaunchError(f"launcher.hostfile {la.hostfile}: {error}; fix: one `HOST slots=N` line per node") from None
    for host in pool:  # DeepSpeed passes them to ssh and pdsh: `-oProxyCommand=...` would be an option
        _host(host, f"launcher.hostfile {la.hostfile}")
    for path in [os.path.abspath("."), *map(os.path.abspath, config_files)]:
        if not environment.plain_word(path):  # DeepSpeed writes them unquoted into the remote command
            raise LaunchError(f"{path!r}: launcher.type {kind} sends this path through a remote shell that would "
                              "reparse it; fix: use a path of letters, digits and . _ - / only")
    filtered = la.include is not None or la.exclude is not None
    try:
        active = ds.parse_inclusion_exclusion(pool, la.include or "", la.exclude or "")
    except ValueError as error:
        raise LaunchError(f"launcher.include/exclude: {error}; fix: name hosts from {la.hostfile}") from None
    if kind == "pdsh" and not filtered:
        short = [h for h, slots in list(active.items())[:la.num_nodes] if len(slots) < la.nproc_per_node]
        if len(active) < la.num_nodes or short:
            raise LaunchError(f"launcher.hostfile {la.hostfile} has {len(active)} host(s) "
                              f"({', '.join(f'{h}: {len(s)} slots' for h, s in active.items())}), but the launcher "
                              f"asks for {la.num_nodes} node(s) x {la.nproc_per_node} slots; fix: set "
                              "launcher.num_nodes / launcher.nproc_per_node to fit, or add hosts")
        active = ds.apply_num_nodes_and_gpus(active, la.num_nodes, la.nproc_per_node)
    world = sum(len(slots) for slots in active.values())
    counts = {len(slots) for slots in active.values()}
    if world != cfg.world_size or len(active) != la.num_nodes or counts != {la.nproc_per_node}:
        what = "after launcher.include/exclude " if filtered else ""
        raise LaunchError(f"launcher.hostfile {la.hostfile} {what}gives "
                          f"{', '.join(f'{h}: {len(s)}' for h, s in active.items())} ranks (world size {world}), but "
                          f"launcher.num_nodes {la.num_nodes} x launcher.nproc_per_node {la.nproc_per_node} = "
                          f"{cfg.world_size}; fix: make them agree (the config's batch and parallel sizes are "
                          "checked against num_nodes x nproc_per_node)")
    master = la.master_addr or next(iter(active))
    exports = environment.forwarded(la, os.environ)
    if la.threads_per_rank:
        exports["OMP_NUM_THREADS"] = str(la.threads_per_rank)
    # DeepSpeed puts each export on the remote command line wrapped in "..." (pdsh) or as -x K="V"
    # (openmpi): only plain non-secret values go that way, the rest through the 0600 launch file.
    # The same for the variables DeepSpeed's runner exports from its own environment (NCCL_*, PYTHON*...).
    overrides, kept = split_overrides(cfg, overrides, shell_safe=True)
    for name, value in list(exports.items()):
        if environment.is_secret(name, value, la.secret_env) or not environment.plain_word(value):
            kept.env[name] = exports.pop(name)
    unset = []
    for name, value in os.environ.items():
        if any(name.startswith(p) for p in _runner_exports(ds)) and name not in exports and not (
                environment.plain_word(value) and not environment.is_secret(name, value, la.secret_env)):
            kept.env.setdefault(name, value)
            unset.append(name)
    if kept:
        overrides = [*overrides, f"--launch-file={kept.path}"]
        kept.hosts = list(active)
    secret = any(environment.is_secret(k, v, la.secret_env) for k, v in {**exports, **kept.env}.items())
    runner_args = ["--hostfile", hostfile, "--launcher", kind, "--master_addr", master,
                   "--master_port", str(la.master_port), "--force_multi", "--no_local_rank", "--module"]
    if la.include is not None:
        runner_args += ["--include", la.include]
    elif la.exclude is not None:
        runner_args += ["--exclude", la.exclude]
    elif kind == "pdsh":
        runner_args += ["--num_nodes", str(la.num_nodes), "--num_gpus", str(la.nproc_per_node)]
    if la.launcher_args:
        runner_args += ["--launcher_args", la.launcher_args]
    if secret:
        runner_args += ["--log_level", "warning"]  # DeepSpeed logs the full pdsh/mpirun command at info
    runner_args += [RANK_ENTRY, *rank_arguments(config_files, overrides)]
    command = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", *runner_args]
    env = {"DS_ENV_FILE": "<file written at launch>", **(_root_mpi_env() if kind == "openmpi" else {})}
    nodes = _deepspeed_nodes(ds, runner_args, pool, active, exports, kind, unset)
    return Plan(kind, command, env, nodes,
                f"{kind}: DeepSpeed runner, {len(active)} node(s) x {la.nproc_per_node} = world size {world}, "
                f"master {master}:{la.master_port}", env_file=exports, launch_file=kept or None, unset=unset,
                secret_env=list(la.secret_env))


def _runner_exports(ds) -> list[str]:
    from deepspeed.accelerator import get_accelerator

    return list(ds.EXPORT_ENVS) + list(get_accelerator().export_envs())


def _deepspeed_nodes(ds, runner_args: list[str], pool, active, exports: dict[str, str], kind: str,
                     unset: list[str]) -> list[Node]:
    """What DeepSpeed's runner will run on each node, computed by DeepSpeed's own runner classes."""
    from deepspeed.launcher import multinode_runner as mr

    args = ds.parse_args([environment.mask_argument(a) for a in runner_args])  # shown, never run
    world_info = ds.encode_world_info(active)
    env = {k: v for k, v in os.environ.items() if k not in unset}  # what runner.main() exports first
    env["PYTHONPATH"] = os.path.abspath(".") + (":" + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    cls = {"pdsh": mr.PDSHRunner, "openmpi": mr.OpenMPIRunner, "mvapich": mr.MVAPICHRunner}[kind]
    runner = cls(args, world_info) if kind == "pdsh" else cls(args, world_info, pool)
    prefixes = _runner_exports(ds)
    for var, value in env.items():
        if any(var.startswith(p) for p in prefixes):
            runner.add_export(var, value)
    for var, value in environment.masked(exports).items():
        runner.add_export(var, value)
    nodes, first = [], 0
    if kind == "pdsh":
        cmd, _, _ = runner.get_cmd(env, active)
        head = 6 + len(_split(args.launcher_args))  # `pdsh -S -f N -w HOSTS [launcher_args]`
        line = " ".join(cmd[head:])
        nodes.append(Node("this host runs", " ".join(cmd[:head]) + " <the node command below, %n = node index>"))
        for index, (host, slots) in enumerate(active.items()):
            nodes.append(Node(f"node {index} ({host}), ranks {first}-{first + len(slots) - 1}",
                              line.replace("%n", str(index))))
            first += len(slots)
        return nodes
    if kind == "mvapich":  # get_cmd writes DeepSpeed's host list: write it to a scratch file instead
        import tempfile

        real, (fd, scratch) = mr.MVAPICH_TMP_HOSTFILE, tempfile.mkstemp()
        os.close(fd)
        try:
            mr.MVAPICH_TMP_HOSTFILE = scratch
            cmd = [real if word == scratch else word for word in runner.get_cmd(env, active)]
        finally:
            mr.MVAPICH_TMP_HOSTFILE = real
            os.unlink(scratch)
    else:
        cmd = runner.get_cmd(env, active)
    nodes.append(Node("this host runs", " ".join(cmd)))
    rank = environment.printable([sys.executable, "-u", "-m", args.user_script, *args.user_args])
    for index, (host, slots) in enumerate(active.items()):
        nodes.append(Node(f"node {index} ({host}), ranks {first}-{first + len(slots) - 1} (started by mpirun)", rank))
        first += len(slots)
    return nodes


def plan(cfg: Config, config_files: list[str], overrides: list[str]) -> Plan:
    kind = cfg.launcher.type
    if cfg.launcher.master_addr:
        _host(cfg.launcher.master_addr, "launcher.master_addr")
    if kind == "local":
        return _plan_with(local_plan)(cfg, config_files, overrides)
    if kind == "slurm":
        return _plan_with(slurm_plan)(cfg, config_files, overrides)
    if kind == "mpirun":
        return _plan_with(mpirun_plan)(cfg, config_files, overrides)
    return deepspeed_plan(cfg, config_files, overrides)


def _host(host: str, where: str) -> str:
    try:
        return environment.check_host(host, where)
    except ValueError as error:
        raise LaunchError(str(error)) from None
