"""Parallel efficiency on this machine: tokens/s of dp=2 (plain, and with ZeRO-1), tp=2 and pp=2
(two ranks, threads per rank chosen by the launcher's rule: cores / ranks) against dp=1 (one rank,
one thread) at the same global batch; dp=1 with every core (`dp1-allcores`) is printed beside it.
`dp2-nosync` is a ceiling, not a training run: dp=2 whose ranks never average their gradients (no
all-reduce, no per-step vote), so each rank runs at its own pace between the windows' barriers; the
gap between it and dp2 is what the per-step synchronization costs (transfer, plus the faster rank
waiting for the slower one in every step).

Every layout is a real training job (a Trainer per rank: DeepSpeed engine, our data),
started once and kept alive while it is measured (dp=1 throughout); a job waiting for its turn
is blocked on a pipe (or in a gloo collective). The driver times each layout in pairs of windows
next to a dp=1 window (order alternating), keeps the pairs in which the rest of the machine stayed quiet
(bench/common.py: Meter), and prints the median of layout / dp=1 tokens/s over them.

    python bench/scaling.py                      # small and medium sizes, GPT-2 style
    python bench/scaling.py --sizes small --rounds 1 --max-rounds 1 --steps 1 --warmup 1   # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# name: (world size, tensor, pipeline, micro batch divisor, threads per rank or None = launcher's
# rule, ZeRO stage). dp2 is plain data parallelism (gradients all-reduced, ZeRO-0); dp2-zero1 adds
# ZeRO-1's sharded optimizer, which on gloo pays a parameter all-gather per step on top.
LAYOUTS = {
    "dp1": (1, 1, 1, 1, 1, 1),
    "dp2": (2, 1, 1, 2, None, 0),
    "dp2-nosync": (2, 1, 1, 2, None, 0),
    "dp2-zero1": (2, 1, 1, 2, None, 1),
    "tp2": (2, 2, 1, 1, None, 1),
    "pp2": (2, 1, 2, 4, None, 1),   # 4 micro-batches per step so the pipeline can overlap them
    "dp1-allcores": (1, 1, 1, 1, None, 1),
}
DEFAULT_STEPS = {"small": 30, "medium": 2}  # windows of ~3 s: 10-step small windows (~1 s) were too noisy


# ----------------------------------------------------------------------------- worker (every rank)


def worker(args) -> int:
    """One rank of one layout's job. Rank 0 reads commands from stdin and answers on the original
    stdout; everything else anything prints goes to stderr (the job's log)."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    common.quiet()
    import torch.distributed as dist

    world, tensor, pipeline, divisor, _, zero = LAYOUTS[args.layout]
    _, _, _, _, micro = common.SIZES[args.size]
    sets = common.overrides(args.size, args.family, world=world, tensor=tensor, pipeline=pipeline, zero=zero,
                            micro_batch=max(1, micro // divisor), global_batch=micro,
                            steps=args.total_steps, cache_dir=args.cache_dir)
    full = common.FullStack(common.load(sets, world))
    if args.layout == "dp2-nosync":  # neither the trainer's nor DeepSpeed's gradient all-reduce
        full.trainer.gradients.sync = None
        full.trainer.engine.enable_backward_allreduce = False
        full.trainer.stop_requested = lambda: False  # its fallback would be a collective per step
    rank = dist.get_rank()

    def command() -> list:
        line = [sys.stdin.readline().strip() if rank == 0 else None]
        dist.broadcast_object_list(line, src=0)
        return (line[0] or "quit").split()

    import torch

    if rank == 0:
        protocol.write(f"ready {full.tokens_per_step} {torch.get_num_threads()}\n")
    while True:
        words = command()
        if words[0] != "run":
            break
        dist.barrier()
        begin = time.perf_counter()
        full.steps(int(words[1]))
        dist.barrier()
        if rank == 0:
            protocol.write(f"done {time.perf_counter() - begin:.6f}\n")
    dist.barrier()
    return 0


# ----------------------------------------------------------------------------- driver


class Job:
    """A layout's ranks as subprocesses (what torchrun would start: RANK, WORLD_SIZE, ...)."""

    def __init__(self, name: str, args, log_dir: str):
        world, tensor, pipeline, _, threads, _ = LAYOUTS[name]
        from megatron_gpt.parallel.cpu.threads import threads_per_rank

        cfg = common.load(common.overrides(args.size, args.family, world=world, tensor=tensor,
                                           pipeline=pipeline, global_batch=common.SIZES[args.size][4],
                                           micro_batch=1), world)
        local = {"LOCAL_WORLD_SIZE": str(cfg.launcher.nproc_per_node)}  # the launcher's rule: cores / local ranks
        self.threads = threads or threads_per_rank(local, cfg.launcher.threads_per_rank)
        self.name = name
        port = str(common.free_port())
        script = os.path.abspath(__file__)
        self.ranks = []
        self.logs = []
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                   "OMP_NUM_THREADS": str(self.threads), "PYTHONWARNINGS": "ignore"}
            log = open(os.path.join(log_dir, f"{args.size}-{name}-rank{rank}.log"), "w")
            self.logs.append(log.name)
            command = [sys.executable, script, "--worker", "--layout", name, "--size", args.size,
                       "--family", args.family, "--total-steps", str(args.total_steps)]
            if args.cache_dir:
                command += ["--cache-dir", args.cache_dir]
            self.ranks.append(subprocess.Popen(
                command, env=env, stdin=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                stdout=subprocess.PIPE if rank == 0 else log, stderr=log, text=True, bufsize=1))
        self.tokens_per_step = 0

    def read(self) -> list[str]:
        line = self.ranks[0].stdout.readline()
        if not line:
            tails = []
            for path in self.logs:
                with open(path) as f:
                    tails.append(f"--- {path}\n" + "".join(f.readlines()[-30:]))
            raise RuntimeError(f"layout {self.name} stopped:\n" + "\n".join(tails))
        return line.split()

    def ready(self) -> None:
        words = self.read()
        self.tokens_per_step, self.threads = int(words[1]), int(words[2])

    def run(self, steps: int) -> float:
        self.ranks[0].stdin.write(f"run {steps}\n")
        self.ranks[0].stdin.flush()
        return float(self.read()[1])

    def close(self) -> None:
        try:
            self.ranks[0].stdin.write("quit\n")
            self.ranks[0].stdin.flush()
        except OSError:
            pass
        for process in self.ranks:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def measure(size: str, args, log_dir: str) -> dict:
    steps = args.steps or DEFAULT_STEPS[size]
    args.size = size
    names = [n for n in args.layouts.split(",") if n != "dp1"]
    max_rounds = args.max_rounds or 3 * args.rounds
    args.total_steps = args.warmup + steps * max_rounds * max(1, len(names)) + 1  # dp1's share, the most
    jobs: dict[str, Job] = {}
    pairs = {name: [] for name in names}  # (layout tokens/s, dp1 tokens/s, foreign cores)
    threads = {}
    try:
        jobs["dp1"] = Job("dp1", args, log_dir)
        jobs["dp1"].ready()
        jobs["dp1"].run(args.warmup)
        # One layout at a time beside dp1: an idle job still holds memory and threads that
        # measurably slowed the job being timed when all layouts were alive at once.
        for name in names:
            job = jobs[name] = Job(name, args, log_dir)
            job.ready()
            job.run(args.warmup)
            pids = [os.getpid()] + [p.pid for j in (jobs["dp1"], job) for p in j.ranks]
            for r in range(max_rounds):
                if sum(f < common.QUIET_CORES for *_, f in pairs[name]) >= args.rounds:
                    break
                rates, foreign = {}, 0.0
                for which in (("dp1", name) if r % 2 == 0 else (name, "dp1")):
                    with common.Meter(pids) as meter:
                        seconds = jobs[which].run(steps)
                    rates[which] = jobs[which].tokens_per_step * steps / seconds
                    foreign = max(foreign, meter.foreign)
                pairs[name].append((rates[name], rates["dp1"], foreign))
            threads[name] = job.threads
            jobs.pop(name).close()
    finally:
        for job in jobs.values():
            job.close()
    layouts, base_rates, busy = {}, [], False
    for name in names:
        quiet = [p for p in pairs[name] if p[2] < common.QUIET_CORES]
        use = quiet if len(quiet) >= max(1, args.rounds // 2) else pairs[name]
        busy = busy or use is pairs[name] and len(quiet) < len(pairs[name])
        base_rates += [b for _, b, _ in use]
        layouts[name] = {"tokens_per_sec": statistics.median(x for x, _, _ in use),
                         "ratio": statistics.median(x / b for x, b, _ in use),
                         "threads": threads[name], "world": LAYOUTS[name][0],
                         "quiet": len(quiet), "pairs": len(pairs[name])}
    dp1 = {"tokens_per_sec": statistics.median(base_rates), "ratio": 1.0, "threads": 1,
           "world": 1, "quiet": None, "pairs": None}
    return {"size": size, "steps": steps, "busy": busy, "layouts": {"dp1": dp1, **layouts}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,medium", help="comma list of: " + ", ".join(common.SIZES))
    parser.add_argument("--family", default="gpt2", choices=list(common.FAMILIES))
    parser.add_argument("--layouts", default="dp1,dp2,dp2-nosync,dp2-zero1,tp2,pp2,dp1-allcores", help="comma list of: " + ", ".join(LAYOUTS))
    parser.add_argument("--rounds", type=int, default=7, help="quiet window pairs (layout, dp1) per layout (median)")
    parser.add_argument("--max-rounds", type=int, default=None, help="rounds to try at most (default: 3 x --rounds)")
    parser.add_argument("--steps", type=int, default=None, help="steps per window (default: per size)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cache-dir", default=None, help="data.cache_dir (default: the package's cache)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--total-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    common.quiet()
    import tempfile

    started = time.perf_counter()
    jitter = common.single_thread_jitter()
    print(f"single-thread jitter: a fixed matmul workload varies by {jitter:.1%} (sd/median) here",
          file=sys.stderr, flush=True)
    log_dir = tempfile.mkdtemp(prefix="megatron-gpt-scaling-")
    results = []
    for size in args.sizes.split(","):
        result = measure(size, args, log_dir)
        results.append(result)
        for name, r in result["layouts"].items():
            rounds = "" if r["pairs"] is None else f" | {r['quiet']} quiet of {r['pairs']} window pairs with dp1"
            print(f"{size:>7} {name:>12}: {r['tokens_per_sec']:>9,.0f} tokens/s | {r['world']} rank(s) x "
                  f"{r['threads']} thread(s) | x{r['ratio']:.2f} of dp1 | efficiency "
                  f"{r['ratio'] / (r['world'] * r['threads']):.0%} per core{rounds}", file=sys.stderr, flush=True)
    parts = []
    for result in results:
        ratios = ", ".join(f"{name} x{r['ratio']:.2f}" for name, r in result["layouts"].items() if name != "dp1")
        busy = " (BUSY machine: some pairs not quiet)" if result["busy"] else ""
        parts.append(f"{result['size']}: dp1 {result['layouts']['dp1']['tokens_per_sec']:,.0f} tokens/s, "
                     f"{ratios}{busy}")
    print(f"scaling: tokens/s over dp1 (1 rank x 1 thread), same global batch: {' | '.join(parts)} | "
          f"{common.machine_state()}, single-thread jitter {jitter:.1%}, {time.perf_counter() - started:.0f}s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
