"""Full-stack training throughput against a plain-PyTorch loop, in one process, interleaved.

(a) megatron-gpt: a Trainer (DeepSpeed engine with ZeRO-1 and torch AdamW, our GPTDataset blend,
    sample order and collate, metrics log) stepped as `Trainer.run` steps it;
(b) nanoGPT's loop in plain PyTorch (bench/common.py): the same model with the same initial
    weights, the same batches (the same dataset samples, read into memory before timing, so data
    loading is charged to (a) only), torch.optim.AdamW (fused, as ours) with the same settings, clipping, LR schedule.

(c) unless --no-compile: (a) with training.compile (each transformer block through
    torch.compile/inductor), against (a) in the same rounds: compiled / eager. Its compile
    warm-up (its first step, timed alone) is reported separately and kept out of tokens/s.

All run in this process with the same thread settings, window after window in alternating
order; tokens/s is the median over windows and the ratio the median of per-window-pair ratios.

    python bench/train_throughput.py                       # both sizes, GPT-2 and Llama style
    python bench/train_throughput.py --sizes small --families gpt2 --windows 3 --steps 2   # smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DEFAULT_STEPS = {"small": 10, "medium": 2}  # steps per timed window


def measure(size: str, family: str, args) -> dict:
    import torch

    steps = args.steps or DEFAULT_STEPS[size]
    max_windows = args.max_windows or 3 * args.windows
    total = args.warmup + steps * max_windows
    # train_steps sizes the index maps: the same for (a) and (c), which takes one more step
    sets = common.overrides(size, family, steps=total + 2, cache_dir=args.cache_dir)
    full = common.FullStack(common.load(sets))
    plain = common.PlainLoop(full, total)
    runners = {"megatron-gpt": full, "plain": plain}
    compile_seconds = None
    if args.compile:
        compiled = common.FullStack(common.load(common.overrides(
            size, family, steps=total + 2, cache_dir=args.cache_dir, extra=["training.compile=true"])))
        started = time.perf_counter()
        compiled.steps(1)  # inductor compiles the blocks' forward and backward in the first step
        compile_seconds = time.perf_counter() - started
        runners["compiled"] = compiled
    pairs = common.interleave(runners, steps, args.windows, args.warmup, max_windows=max_windows)
    full_losses = full.losses()
    plain_losses = [float(x) for x in plain.losses]
    # Same weights, same samples, same optimizer: the first steps' losses agree to rounding (over
    # longer runs rounding differences grow, as between any two kernels' summation orders).
    diffs = [abs(x - y) for x, y in zip(full_losses, plain_losses)]
    return {"case": f"{size}-{family}", "full": pairs.tokens_per_sec("megatron-gpt"),
            "plain": pairs.tokens_per_sec("plain"), "ratio": pairs.ratio("megatron-gpt", "plain"),
            "loss_diff": max(diffs[:10]), "steps": len(diffs), "threads": torch.get_num_threads(),
            "rounds": pairs.describe(), "busy": pairs.busy, "window_steps": steps,
            **({} if compile_seconds is None else {
                "compiled": pairs.tokens_per_sec("compiled"), "compile_ratio": pairs.ratio("compiled", "megatron-gpt"),
                "compile_seconds": compile_seconds, "compile_loss_diff": max(
                    abs(x - y) for x, y in zip(compiled.losses()[:10], full_losses[:10]))})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,medium", help="comma list of: " + ", ".join(common.SIZES))
    parser.add_argument("--families", default="gpt2,llama", help="comma list of: " + ", ".join(common.FAMILIES))
    parser.add_argument("--windows", type=int, default=11, help="quiet rounds (one window per side) to take the median of")
    parser.add_argument("--max-windows", type=int, default=None, help="rounds to try at most (default: 3 x --windows)")
    parser.add_argument("--steps", type=int, default=None, help="steps per window (default: per size)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    parser.add_argument("--cache-dir", default=None, help="data.cache_dir (default: the package's cache)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="leave out the training.compile runner (c)")
    args = parser.parse_args(argv)
    common.quiet()
    common.single_process_env()
    started = time.perf_counter()
    results = []
    for size in args.sizes.split(","):
        for family in args.families.split(","):
            r = measure(size, family, args)
            results.append(r)
            print(f"{r['case']:>13}: megatron-gpt {r['full']:>9,.0f} tokens/s | plain PyTorch {r['plain']:>9,.0f} "
                  f"tokens/s | ratio {r['ratio']:.3f} | {r['rounds']} x {r['window_steps']} steps, "
                  f"{r['threads']} threads | |loss(a) - loss(b)| over the first 10 steps <= {r['loss_diff']:.1e}",
                  file=sys.stderr, flush=True)
            if "compiled" in r:
                print(f"{r['case']:>13}: compiled {r['compiled']:>9,.0f} tokens/s | eager {r['full']:>9,.0f} tokens/s "
                      f"| ratio {r['compile_ratio']:.3f} | compile {r['compile_seconds']:.0f}s (first step, not "
                      f"in tokens/s) | |loss(compiled) - loss(eager)| <= {r['compile_loss_diff']:.1e}",
                      file=sys.stderr, flush=True)
    cases = " | ".join(f"{r['case']} {r['ratio']:.3f}{' (BUSY)' if r['busy'] else ''} "
                       f"({r['full']:,.0f} vs {r['plain']:,.0f} tokens/s)" for r in results)
    compiled = " | ".join(f"{r['case']} x{r['compile_ratio']:.3f} ({r['compiled']:,.0f} vs {r['full']:,.0f} "
                          f"tokens/s, compile {r['compile_seconds']:.0f}s)" for r in results if "compiled" in r)
    compiled = f" | compiled / eager: {compiled}" if compiled else ""
    print(f"train_throughput: full stack / plain PyTorch: {cases}{compiled} | {common.machine_state()}, "
          f"{time.perf_counter() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
