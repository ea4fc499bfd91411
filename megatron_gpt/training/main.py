"""Per-rank entry point that launchers start: `python -m megatron_gpt.training.main CONFIG... --set K=V`."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

STARTED = time.perf_counter()  # before the heavy imports, so set-up time includes them


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron_gpt.training.main")
    parser.add_argument("configs", nargs="+", help="YAML files, merged in order")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by `deepspeed` without --no_local_rank; LOCAL_RANK wins
    parser.add_argument("--launch-file", default=None, metavar="PATH",
                        help="JSON from the launcher: more overrides and variables (secrets, values a remote "
                             "shell would reparse) that do not travel on the command line")
    args = parser.parse_args(argv)
    import json

    carried = os.environ.pop("MEGATRON_GPT_LAUNCH", None)  # launch.plans.LAUNCH_VARIABLE
    if args.launch_file:
        with open(os.path.expanduser(args.launch_file), encoding="utf-8") as f:
            carried = f.read()
    if carried:
        carried = json.loads(carried)
        args.overrides = [*args.overrides, *carried.get("overrides", [])]
        os.environ.update(carried.get("env", {}))
    return args


def say_line(text: str) -> None:
    """One line in one write: ranks share the launcher's stdout, and print()'s separate write of
    the newline let two ranks' lines run together (seen under mpirun)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def join_launch(configs: list[str], overrides: list[str]) -> str:
    """Before the process group: RANK/WORLD_SIZE/MASTER_* from srun or mpirun when torchrun or
    DeepSpeed did not set them, launcher.env, threads; prints this rank's line. Returns the source."""
    from megatron_gpt.config.loader import resolve
    from megatron_gpt.launch import ranks
    from megatron_gpt.parallel.cpu.threads import threads_per_rank

    launcher = resolve(configs, overrides)[0].launcher
    how = ranks.discover(os.environ, launcher.master_addr, launcher.master_port)
    os.environ.update(launcher.env)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(os.environ, launcher.threads_per_rank)))
    if how != "single":
        master, port = os.environ.get("MASTER_ADDR", "?"), int(os.environ.get("MASTER_PORT", "0") or 0)
        say_line(f"rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']} local_rank {os.environ.get('LOCAL_RANK', '0')} "
                 f"node {ranks.address_towards(master, port or 1)} ({os.uname().nodename}) started by {how}; "
                 f"rendezvous {master}:{port}")
    return how


def failed(message: str, code: int) -> int:
    """Print this rank's one-line error and leave it (with the exit code) in the launcher's error
    file, so the launcher can end with it under torchrun's own report of the failure."""
    from megatron_gpt.launch.protocol import ERROR_FILE

    print(message, file=sys.stderr, flush=True)
    path = os.environ.get(ERROR_FILE)
    if path:
        try:
            with open(path, "a", encoding="utf-8") as f:  # O_APPEND: each rank's line lands whole
                f.write(f"{code}\t{os.environ.get('RANK', '0')}\t{' '.join(message.split())}\n")
        except OSError:
            pass
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module="megatron")  # import-time notices about optional deps
    # DeepSpeed's ZeRO still calls this deprecated torch collective: one warning per rank, no action.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, rather than DeepSpeed warning per rank
    from megatron_gpt.config import ConfigError, load_config
    from megatron_gpt.training import preemption

    preemption.watch()  # from here on, SIGTERM/SIGUSR1 stops training at the next step boundary
    try:
        join_launch(args.configs, args.overrides)
        cfg = load_config(args.configs, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as error:
        return failed(f"error: {error}", 2)
    from megatron_gpt.checkpoint.errors import CheckpointError
    from megatron_gpt.data.errors import DataError
    from megatron_gpt.parallel.groups import shutdown
    from megatron_gpt.launch.protocol import DIVERGED_EXIT_CODE
    from megatron_gpt.training.guard import Diverged
    from megatron_gpt.training.trainer import train

    try:
        train(cfg, STARTED)
        import torch.distributed as dist

        if dist.is_initialized():
            say_line(f"rank {dist.get_rank()}/{dist.get_world_size()}: finished")
    except preemption.Preempted:
        return preemption.exit_code()
    except (ConfigError, DataError, CheckpointError) as error:
        return failed(f"error: {error}", 2)
    except Diverged as error:
        return failed(f"error: {error}", DIVERGED_EXIT_CODE)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
