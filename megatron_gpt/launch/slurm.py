"""`megatron-gpt slurm CONFIG...`: write an sbatch script that runs one srun task per rank.

The script asks SLURM for SIGUSR1 on every rank some minutes before the time limit
(`--signal=USR1@SECONDS`); the ranks then save a checkpoint at the next step boundary and exit
with the preemption code, and the script requeues the job, which resumes from that checkpoint.
launch/slurm/train.sbatch is the same script as a hand-editable template.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from megatron_gpt.config.schema import Config
from megatron_gpt.launch import environment
from megatron_gpt.launch.plans import rank_command
from megatron_gpt.launch.protocol import EXIT_CODE


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


def _directive_value(option: str, value: str) -> str:
    """A value for an `#SBATCH --option=value` line: one plain word (a newline would start a new
    line of the script, a space or quote would be cut or kept by sbatch's own parsing)."""
    if not environment.plain_word(value) or value.startswith("-"):
        raise ValueError(f"--{option} {value!r}: an sbatch directive value must be one word of letters, digits "
                         "and @ % + = : , . / _ - (not starting with '-'); fix: rename it (the job name defaults "
                         "to the config's `name`)")
    return value


def sbatch_script(cfg: Config, config_files: list[str], overrides: list[str], opts: SbatchOptions) -> str:
    la = cfg.launcher
    if la.master_addr:
        environment.check_host(la.master_addr, "launcher.master_addr")
    for option, value in (("job-name", opts.job_name or cfg.name), ("partition", opts.partition),
                          ("time", opts.time), ("account", opts.account), ("output", opts.log)):
        if value is not None:
            _directive_value(option, value)
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
    secrets = sorted(k for k, v in la.env.items() if environment.is_secret(k, v, la.secret_env))
    exports.update({k: v for k, v in la.env.items() if k not in secrets})
    srun = ["srun", "--kill-on-bad-exit=1", *shlex.split(la.launcher_args), *rank_command(config_files, overrides)]
    command = " ".join(shlex.quote(environment.mask_argument(word, la.secret_env)) for word in srun)
    if any(environment.mask_argument(o, la.secret_env) != o for o in overrides):
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
