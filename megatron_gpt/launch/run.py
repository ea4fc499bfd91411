"""Runs a launch plan (launch.plans): the command that starts every rank, with signals forwarded
and the preemption exit code passed back. Never joins a process group itself."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile

from megatron_gpt.config.schema import Config
from megatron_gpt.launch import environment
from megatron_gpt.launch.plans import LAUNCH_VARIABLE, RANK_ENTRY, LaunchError, LaunchFile, Plan, plan, rank_arguments
from megatron_gpt.launch.protocol import ERROR_FILE, EXIT_CODE, EXIT_FILE, SIGNALS

__all__ = ["RANK_ENTRY", "LaunchError", "launch", "describe", "rank_arguments"]


def describe(p: Plan) -> str:
    """The --dry-run text: the command on this host, then what each node runs (secrets masked)."""
    lines = [f"# {p.summary}", "# on this host:", environment.printable(p.command, p.env, p.secret_env)]
    if p.env_file:
        lines.append("# DS_ENV_FILE (DeepSpeed exports these on every node): "
                     + " ".join(f"{k}={v}" for k, v in environment.masked(p.env_file, p.secret_env).items()))
    if p.launch_file:
        where = (f"{p.launch_file.path} on {', '.join(p.launch_file.hosts)} (written 0600 through ssh at launch, "
                 "removed at the end)" if p.launch_file.hosts else f"{LAUNCH_VARIABLE} in the ranks' environment")
        lines.append(f"# {where}, read by every rank: "
                     + " ".join([*(f"--set {environment.mask_argument(o, p.secret_env)}" for o in p.launch_file.overrides),
                                 *(f"{k}={shlex.quote(v)}" for k, v in
                                   environment.masked(p.launch_file.env, p.secret_env).items())]))
    for node in p.nodes:
        lines += [f"# {node.where}:", node.command]
    lines += [f"# {note}" for note in p.notes]
    return "\n".join(lines)


def _rank_pids(pid: int) -> list[int]:
    """Child processes of `pid` (torchrun's workers), from /proc."""
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return children


def _first_error(path: str) -> tuple[int, str] | None:
    """The first rank error line written to the ERROR_FILE: (its exit code, `rank R: message`)."""
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
        code, rank, message = line.rstrip("\n").split("\t", 2)
        return int(code), f"rank {rank}: {message}"
    except (OSError, ValueError):
        return None


def _remote(host: str, command: str, data: str = "") -> subprocess.CompletedProcess:
    """`command` run by `host`'s shell over plain ssh (as DeepSpeed's runner reaches it); `data`
    goes through stdin, never a command line."""
    return subprocess.run(["ssh", "-o", "BatchMode=yes", host, command], input=data, text=True,
                          capture_output=True, timeout=120)


def _send_launch_file(launch: LaunchFile) -> None:
    """Write the launch file on every node: 0600 (umask), never over an existing file (set -C)."""
    name = launch.path.removeprefix("~/")
    for host in launch.hosts:
        done = _remote(host, f"set -C; umask 077; cat > {name}", launch.json())
        if done.returncode != 0:
            _remove_launch_file(launch)
            raise LaunchError(f"could not write the launch file ~/{name} on {host} through ssh "
                              f"({done.stderr.strip()[-300:] or f'exit {done.returncode}'}); fix: check that "
                              f"`ssh {host}` works without a password from this host")


def _remove_launch_file(launch: LaunchFile) -> None:
    for host in launch.hosts:
        try:
            _remote(host, f"rm -f {launch.path.removeprefix('~/')}")
        except (OSError, subprocess.SubprocessError):
            pass


def run(p: Plan) -> int:
    """Run the plan's command; forward SIGTERM/SIGUSR1 so ranks checkpoint and stop; return its code."""
    env = {k: v for k, v in {**os.environ, **p.env}.items() if k not in p.unset}
    cleanup: list[str] = []
    if p.launch_file is not None and not p.launch_file.hosts:
        env[LAUNCH_VARIABLE] = p.launch_file.json()
    elif p.launch_file is not None:
        _send_launch_file(p.launch_file)
    if p.env_file is not None:  # DeepSpeed reads DS_ENV_FILE and exports each line on every node
        fd, path = tempfile.mkstemp(prefix="megatron-gpt-env-")  # 0600: may hold secrets
        with os.fdopen(fd, "w") as f:
            for name in (os.path.expanduser("~/.deepspeed_env"), ".deepspeed_env"):
                if os.path.isfile(name):  # DS_ENV_FILE replaces these, so keep what they say
                    f.write(open(name).read().rstrip("\n") + "\n")
            for k, v in p.env_file.items():
                if "\n" in v:
                    print(f"warning: {k} has a newline in its value; not forwarded", file=sys.stderr)
                    continue
                f.write(f"{k}={v}\n")
        env["DS_ENV_FILE"] = path
        cleanup.append(path)
    if p.signal_ranks:
        fd, exit_file = tempfile.mkstemp(prefix="megatron-gpt-exit-")
        os.close(fd)
        env[EXIT_FILE] = exit_file
        cleanup.append(exit_file)
        fd, error_file = tempfile.mkstemp(prefix="megatron-gpt-error-")
        os.close(fd)
        env[ERROR_FILE] = error_file
        cleanup.append(error_file)
    child = subprocess.Popen(p.command, env=env)

    def forward(signum, frame):
        if p.signal_ranks:  # torchrun would tear its workers down; tell the ranks themselves
            targets = _rank_pids(child.pid) or [child.pid]
        else:  # srun and mpirun pass signals on; DeepSpeed's runner stops its nodes on SIGTERM
            targets = [child.pid]
            signum = signum if p.kind in ("slurm", "mpirun") else signal.SIGTERM
        print(f"megatron-gpt: {signal.Signals(signum).name} -> ranks save at the next step boundary",
              file=sys.stderr, flush=True)
        for pid in targets:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
    try:
        code = child.wait()
        if p.signal_ranks and code == 0 and os.path.getsize(exit_file):
            with open(exit_file) as f:
                code = int(f.read().strip() or 0)
        failure = _first_error(error_file) if p.signal_ranks and code != 0 else None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if p.launch_file is not None and p.launch_file.hosts:
            _remove_launch_file(p.launch_file)
        for path in cleanup:
            try:
                os.unlink(path)
            except OSError:
                pass
    if failure is not None:  # the rank's own line last, under torchrun's report (the traceback is above)
        code, message = failure
        print(message, file=sys.stderr, flush=True)
        return code
    if code == EXIT_CODE:
        print(f"megatron-gpt: preempted; a checkpoint was saved, relaunch the same command to resume "
              f"(exit code {EXIT_CODE})", file=sys.stderr)
    return code


def launch(cfg: Config, config_files: list[str], overrides: list[str], dry_run: bool = False) -> int:
    try:
        p = plan(cfg, config_files, overrides)
        if cfg.launcher.type == "slurm" and not dry_run and "SLURM_JOB_ID" not in os.environ:
            raise LaunchError("launcher.type slurm starts ranks with srun inside an allocation, and this shell "
                              "has none (no SLURM_JOB_ID); fix: run inside salloc/sbatch, or write a batch "
                              "script with `megatron-gpt slurm CONFIG... --nodes N --gpus-per-node G`")
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if dry_run:
        print(describe(p))
        return 0
    try:
        return run(p)
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
