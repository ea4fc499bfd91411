"""Peak GPU memory against the memory plan (`megatron-gpt layout`, training.memory_plan), and the
speed each recompute mode costs: for every size and model.recompute mode, the full stack (Trainer,
DeepSpeed engine, ZeRO-1 on one GPU, our data path) trains a few steps in bf16 while
torch.cuda.max_memory_allocated records the peak; the plan's total for that rank (parameters,
gradients, optimizer states, activations) is printed beside it with their ratio.

    python bench/memory.py --sizes 125m,1.3b             # what bench/gpu.sh runs (CUDA only)
    python bench/memory.py --sizes 125m --modes none,full

The plan counts what lives between a micro-batch's forward and its backward plus the weights and
optimizer; the peak also holds transient tensors (gradients of activations, the optimizer's
temporaries, allocator rounding), so a ratio a little above 1 is expected.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MIB = 2**20


def plan_bytes(cfg, vocab_size: int) -> tuple[float, float]:
    """(the plan's total bytes, its activation bytes) for rank 0 of a one-GPU run."""
    from megatron_gpt.config.derive import batch_layout
    from megatron_gpt.training.layout_report import layout_report, memory_mib
    from megatron_gpt.training.memory_plan import stage_activations

    _, params = layout_report(cfg, 1, vocab_size)
    weights, grads, optimizer = memory_mib(params, cfg, 1)
    micro_batches = batch_layout(cfg, 1).gradient_accumulation_steps
    acts = stage_activations(cfg, vocab_size, cfg.model.num_layers, True, True, micro_batches=micro_batches,
                             device="cuda")
    return (weights + grads + optimizer) * MIB + acts.total, acts.total


def measure(size: str, mode: str, args) -> dict:
    import torch

    from megatron_gpt.config import padded_vocab_size
    from megatron_gpt.data.tokenizer import build_tokenizer

    extra = ["training.device=cuda", f"training.precision={args.precision}", f"model.recompute={mode}",
             f"model.recompute_num_layers={args.recompute_num_layers}"]
    sets = common.overrides(size, args.family, steps=args.warmup + args.steps + 1, cache_dir=args.cache_dir,
                            extra=extra)
    cfg = common.load(sets)
    vocab = padded_vocab_size(build_tokenizer(cfg.tokenizer).vocab_size, cfg)
    planned, activations = plan_bytes(cfg, vocab)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    full = common.FullStack(cfg)
    full.steps(args.warmup)
    torch.cuda.synchronize()
    begin = time.perf_counter()
    full.steps(args.steps)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - begin
    peak = torch.cuda.max_memory_allocated()
    result = {"size": size, "mode": mode, "peak": peak, "plan": planned, "activations": activations,
              "tokens_per_sec": full.tokens_per_step * args.steps / seconds}
    del full
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="125m,1.3b", help="comma list of: " + ", ".join(common.GPU_SIZES))
    parser.add_argument("--modes", default="none,selective,full", help="model.recompute modes to run")
    parser.add_argument("--recompute-num-layers", type=int, default=1)
    parser.add_argument("--family", default="gpt2", choices=list(common.FAMILIES))
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (the peak counts them too)")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench/memory.py: needs a CUDA device (torch.cuda.max_memory_allocated); nothing to measure",
              file=sys.stderr)
        return 2
    common.quiet()
    common.single_process_env()
    parts = []
    for size in args.sizes.split(","):
        for mode in args.modes.split(","):
            r = measure(size, mode, args)
            ratio = r["peak"] / r["plan"]
            print(f"{size:>5} recompute {mode:<9}: peak {r['peak'] / MIB:,.0f} MiB | plan {r['plan'] / MIB:,.0f} MiB "
                  f"(activations {r['activations'] / MIB:,.0f}) | peak/plan {ratio:.3f} | "
                  f"{r['tokens_per_sec']:,.0f} tokens/s", file=sys.stderr, flush=True)
            parts.append(f"{size} {mode} {ratio:.3f} ({r['tokens_per_sec']:,.0f} tokens/s)")
    print(f"memory (GPU, {args.precision}, peak/plan): {' | '.join(parts)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
