"""`megatron-gpt slurm CONFIG...`: write an sbatch script that runs one srun task per rank.

The script asks SLURM for SIGUSR1 on every rank some minutes before the time limit
(`--signal=USR1@SECONDS`); the ranks then save a checkpoint at the next step boundary and exit
with the preemption code, and the script requeues the job, which resumes from that checkpoint.
launch/slurm/train.sbatch is the same script as a hand-editable template.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass

from megatron_gpt.config.schema import Config
from megatron_gpt.launch import environment
from megatron_gpt.launch.commands import rank_command
from megatron_gpt.training.preemption import EXIT_CODE


@dataclass
class SbatchOptions:
    nodes: int
    ntasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str | None = None
    log: str = "slurm-%x-%j.out"
    signal_before: int = 300
    requeue: bool = True


def sbatch_script(cfg: Config, config_files: list[str], overrides: list[str], opts: SbatchOptions) -> str:
    la = cfg.launcher
    directives = [f"--job-name={opts.job_name or cfg.name}", f"--nodes={opts.nodes}",
                  f"--ntasks-per-node={opts.ntasks_per_node}"]
    if opts.gpus_per_node:
        directives.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.cpus_per_task:
        directives.append(f"--cpus-per-task={opts.cpus_per_task}")
    for name in ("partition", "time", "account"):
        if getattr(opts, name):
            directives.append(f"--{name}={getattr(opts, name)}")
    directives += [f"--output={opts.log}", "--open-mode=append", f"--signal=USR1@{opts.signal_before}"]
    if opts.requeue:
        directives.append("--requeue")
    exports = {"MASTER_PORT": str(la.master_port)}
    if la.master_addr:
        exports["MASTER_ADDR"] = la.master_addr
    if la.threads_per_rank or opts.cpus_per_task:
        exports["OMP_NUM_THREADS"] = str(la.threads_per_rank or opts.cpus_per_task)
    secrets = sorted(k for k in la.env if environment.is_secret(k))
    exports.update({k: v for k, v in la.env.items() if k not in secrets})
    srun = ["srun", "--kill-on-bad-exit=1", *shlex.split(la.launcher_args), *rank_command(config_files, overrides)]
    command = " ".join(shlex.quote(environment.mask_argument(word)) for word in srun)
    if any(environment.mask_argument(o) != o for o in overrides):
        raise ValueError("a secret is set with --set launcher.env...; it would be written into the script. "
                         "fix: put it in the environment you submit from (sbatch passes it on) or in a config file")
    lines = [
        "#!/bin/bash",
        "# Written by `megatron-gpt slurm` (launch/slurm/train.sbatch is the annotated template).",
        "# Submit with: sbatch THIS_FILE. One srun task per rank: each rank takes RANK, WORLD_SIZE and",
        "# LOCAL_RANK from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID, and rendezvous at the first node",
        "# of the job (MASTER_ADDR) on MASTER_PORT.",
        *(f"#SBATCH {d}" for d in directives),
        "",
        f"# SIGUSR1 {opts.signal_before}s before the time limit (and SIGTERM on preemption or scancel): every rank",
        f"# saves a checkpoint at the next step boundary and exits {EXIT_CODE}; the job is then requeued and",
        "# resumes from that checkpoint (checkpoint.resume: true).",
        "set -u",
        f"cd {shlex.quote(os.getcwd())}",
        *(f"export {k}={shlex.quote(v)}" for k, v in exports.items()),
        *(f"# {k}: set on every rank from the config (launcher.env), not written here" for k in secrets),
        f"echo \"job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES node(s) [$SLURM_JOB_NODELIST], "
        f"{opts.ntasks_per_node} task(s) per node, restart ${{SLURM_RESTART_COUNT:-0}}\"",
        command,
        "status=$?",
        f"if [ \"$status\" -eq {EXIT_CODE} ]; then",
        "  echo \"preempted: checkpoint saved at a step boundary\"",
        # the message first: `scontrol requeue` kills this script, often before a later echo runs
        *(["  echo \"requeuing job $SLURM_JOB_ID; it resumes from the checkpoint\"",
           "  scontrol requeue \"$SLURM_JOB_ID\""] if opts.requeue else []),
        "fi",
        "exit \"$status\"",
        "",
    ]
    return "\n".join(lines)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "slurm", help="write an sbatch script that trains CONFIG... on SLURM (one srun task per rank)",
        description="Write an sbatch script; submit it with `sbatch FILE`. Ranks per node = "
                    "--ntasks-per-node (default: --gpus-per-node, or launcher.nproc_per_node without GPUs).")
    parser.add_argument("configs", nargs="+", help="YAML files, merged in order (later wins)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key (value parsed as YAML); repeatable")
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default launcher.num_nodes)")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs per node, one rank each (default launcher.nproc_per_node; 0: CPU-only job)")
    parser.add_argument("--ntasks-per-node", type=int, default=None, help="ranks per node (default: GPUs per node)")
    parser.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per rank")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--time", default=None, help="time limit, e.g. 2-00:00:00")
    parser.add_argument("--account", default=None)
    parser.add_argument("--job-name", default=None, help="default: the config's name")
    parser.add_argument("--log", default="slurm-%x-%j.out", help="the job's output file (SLURM patterns)")
    parser.add_argument("--signal-before", type=int, default=300, metavar="SECONDS",
                        help="ask SLURM for SIGUSR1 this long before the time limit (default 300)")
    parser.add_argument("--no-requeue", dest="requeue", action="store_false",
                        help="do not requeue the job after a preemption checkpoint")
    parser.add_argument("-o", "--output", default=None, help="write the script here (default: stdout)")
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    from megatron_gpt.config import ConfigError, load_config
    from megatron_gpt.config.loader import resolve

    try:
        base, _ = resolve(args.configs, args.overrides)  # launcher defaults for the options not given
        nodes = args.nodes or base.launcher.num_nodes
        gpus = base.launcher.nproc_per_node if args.gpus_per_node is None else args.gpus_per_node
        tasks = args.ntasks_per_node or gpus or base.launcher.nproc_per_node
        overrides = [*args.overrides, "launcher.type=slurm", f"launcher.num_nodes={nodes}",
                     f"launcher.nproc_per_node={tasks}"]
        cfg = load_config(args.configs, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    opts = SbatchOptions(nodes=nodes, ntasks_per_node=tasks, gpus_per_node=gpus, cpus_per_task=args.cpus_per_task,
                         partition=args.partition, time=args.time, account=args.account, job_name=args.job_name,
                         log=args.log, signal_before=args.signal_before, requeue=args.requeue)
    try:
        script = sbatch_script(cfg, args.configs, overrides, opts)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not cfg.checkpoint.save_dir:
        print("warning: checkpoint.save_dir is not set: a preempted job stops without a checkpoint to resume from",
              file=sys.stderr)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(script)
        os.chmod(args.output, 0o755)
        print(f"wrote {args.output}; submit with: sbatch {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(script)
    return 0
