"""Turns a resolved config into the command that starts every rank. Builds and runs commands;
never joins a process group itself."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from megatron_gpt.config.schema import Config

RANK_ENTRY = "megatron_gpt.training.main"


def threads_per_rank(cfg: Config) -> int:
    """Intra-op threads per rank: this host's cores shared out, so ranks do not oversubscribe."""
    if cfg.launcher.threads_per_rank:
        return cfg.launcher.threads_per_rank
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // cfg.launcher.nproc_per_node)


def rank_arguments(config_files: list[str], overrides: list[str]) -> list[str]:
    args = [os.path.abspath(path) for path in config_files]
    for override in overrides:
        args += ["--set", override]
    return args


def local_command(cfg: Config, config_files: list[str], overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """torchrun on this host with nproc_per_node ranks (free rendezvous port via --standalone)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={cfg.launcher.nproc_per_node}", "-m", RANK_ENTRY,
               *rank_arguments(config_files, overrides)]
    env = {"OMP_NUM_THREADS": str(threads_per_rank(cfg))}
    return command, env


def launch(cfg: Config, config_files: list[str], overrides: list[str], dry_run: bool = False) -> int:
    command, env = local_command(cfg, config_files, overrides)
    printable = " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(command)
    if dry_run:
        print(printable)
        return 0
    completed = subprocess.run(command, env={**os.environ, **env})
    return completed.returncode
