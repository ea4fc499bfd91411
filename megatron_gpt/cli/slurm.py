"""`megatron-gpt slurm CONFIG...`: argument parsing; the script itself is launch.slurm's."""

from __future__ import annotations

import argparse
import os
import sys

from megatron_gpt.launch.slurm import SbatchOptions, sbatch_script


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
    if args.output:  # 0700: the script names paths and settings others need not read
        temporary = f"{args.output}.tmp{os.getpid()}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(script)
        os.chmod(temporary, 0o700)
        os.replace(temporary, args.output)
        print(f"wrote {args.output}; submit with: sbatch {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(script)
    return 0
