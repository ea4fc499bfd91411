"""Model FLOPs utilization: the model FLOP/s a full-stack training step achieves (Megatron's count,
megatron_gpt.training.observe.flops: 3 x forward, attention over the full sequence, padded vocabulary)
over the FLOP/s of one large matmul timed in the same process, window after window in
alternating order, on the same threads: MFU against what this machine measurably does.

On a GPU (--device cuda, bf16) it reports MFU against the device's dense bf16 peak
(megatron_gpt.training.observe.flops.PEAK_TFLOPS_16BIT, or --peak-tflops), with the measured bf16 matmul
beside it.

    python bench/mfu.py                                    # CPU: small and medium, GPT-2 style
    python bench/mfu.py --device cuda --sizes 125m,350m,1.3b   # one GPU (see bench/gpu.sh)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DEFAULT_STEPS = {"small": 20, "medium": 3, "125m": 10, "350m": 5, "1.3b": 3}


class Matmul:
    """C = A @ B on square n x n matrices, `reps` calls a "step" (2 n^3 FLOPs a call), so that a
    window of matmul steps lasts about as long as a window of training steps."""

    def __init__(self, n: int, device, dtype):
        import torch

        self.a = torch.randn(n, n, device=device, dtype=dtype)
        self.b = torch.randn(n, n, device=device, dtype=dtype)
        self.out = torch.empty(n, n, device=device, dtype=dtype)
        self.flops_per_call = 2.0 * n ** 3
        self.reps = 1
        self.tokens_per_step = 0

    @property
    def flops(self) -> float:
        return self.flops_per_call * self.reps

    def steps(self, count: int) -> None:
        import torch

        for _ in range(count * self.reps):
            torch.mm(self.a, self.b, out=self.out)


class Synced:
    """A runner whose window ends when the device has finished (CUDA kernels are asynchronous)."""

    def __init__(self, runner, device):
        self.runner, self.device = runner, device
        self.tokens_per_step = runner.tokens_per_step

    def steps(self, count: int) -> None:
        import torch

        self.runner.steps(count)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def measure(size: str, args) -> dict:
    import torch

    from megatron_gpt.config import padded_vocab_size
    from megatron_gpt.data.tokenizer import build_tokenizer
    from megatron_gpt.training.observe.flops import peak_flops, training_flops_per_token

    cuda = args.device == "cuda"
    steps = args.steps or DEFAULT_STEPS[size]
    max_windows = args.max_windows or 3 * args.windows
    total = args.warmup + 1 + steps * max_windows
    extra = [f"training.device={args.device}", f"training.precision={args.precision}"]
    cfg = common.load(common.overrides(size, args.family, steps=total + 1, cache_dir=args.cache_dir, extra=extra))
    vocab = padded_vocab_size(build_tokenizer(cfg.tokenizer).vocab_size, cfg)
    full = common.FullStack(cfg)
    device = full.trainer.topo.device
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    matmul = Matmul(args.matmul_size or (8192 if cuda else 2048), device, dtype)
    train, mm = Synced(full, device), Synced(matmul, device)
    for runner in (train, mm):  # warm up, then size the matmul "step" like a training step
        runner.steps(args.warmup)
    seconds = {}
    for name, runner in (("train", train), ("matmul", mm)):
        begin = time.perf_counter()
        runner.steps(1)
        seconds[name] = time.perf_counter() - begin
    matmul.reps = max(1, round(seconds["train"] / seconds["matmul"]))
    pairs = common.interleave({"train": train, "matmul": mm}, steps, args.windows, 0, max_windows=max_windows)
    flops_per_step = training_flops_per_token(cfg.model, vocab) * full.tokens_per_step
    keep = pairs.keep
    achieved = [flops_per_step * steps / pairs.timed["train"].seconds[i] for i in keep]
    measured_peak = [matmul.flops * steps / pairs.timed["matmul"].seconds[i] for i in keep]
    import statistics

    result = {
        "size": size, "tokens_per_sec": pairs.tokens_per_sec("train"), "rounds": pairs.describe(), "busy": pairs.busy,
        "achieved": statistics.median(achieved), "matmul": statistics.median(measured_peak),
        "mfu_measured": statistics.median(a / p for a, p in zip(achieved, measured_peak)),
        "threads": torch.get_num_threads(), "device": device, "dtype": args.precision,
        "parameters": sum(p.numel() for p in full.trainer.model.parameters()),
    }
    spec = peak_flops(args.peak_tflops, device, args.precision)
    if spec:
        result["spec"] = spec
        result["mfu_spec"] = result["achieved"] / spec
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help="comma list of: " + ", ".join(common.SIZES)
                        + " (default: small,medium on CPU, 125m,350m,1.3b on CUDA)")
    parser.add_argument("--family", default="gpt2", choices=list(common.FAMILIES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: known GPUs)")
    parser.add_argument("--windows", type=int, default=7, help="quiet rounds (training window + matmul window)")
    parser.add_argument("--max-windows", type=int, default=None, help="rounds to try at most (default: 3 x --windows)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (and matmuls) per window")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=None, help="n of the n x n matmul (2048 CPU, 8192 GPU)")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    sizes = (args.sizes or (",".join(common.GPU_SIZES) if args.device == "cuda" else "small,medium")).split(",")
    common.quiet()
    common.single_process_env()
    started = time.perf_counter()
    results = []
    for size in sizes:
        r = measure(size, args)
        results.append(r)
        spec = (f" | MFU {r['mfu_spec']:.1%} of the {r['spec'] / 1e12:,.0f} TFLOP/s {r['dtype']} peak"
                if "spec" in r else "")
        print(f"{size:>7}: {r['parameters'] / 1e6:,.1f}M parameters | {r['tokens_per_sec']:,.0f} tokens/s | "
              f"{r['achieved'] / 1e12:.3f} TFLOP/s | matmul peak {r['matmul'] / 1e12:.3f} TFLOP/s ({r['dtype']}, "
              f"{r['threads']} threads) | MFU {r['mfu_measured']:.1%} of measured{spec} | {r['rounds']}",
              file=sys.stderr, flush=True)
    where = "GPU" if args.device == "cuda" else "CPU"
    parts = []
    for r in results:
        part = (f"{r['size']} {r['mfu_measured']:.1%}{' (BUSY)' if r['busy'] else ''} "
                f"({r['achieved'] / 1e9:,.1f} of {r['matmul'] / 1e9:,.1f} "
                f"GFLOP/s matmul, {r['tokens_per_sec']:,.0f} tokens/s)")
        if "spec" in r:
            part += f", {r['mfu_spec']:.1%} of {r['spec'] / 1e12:,.0f} TFLOP/s {r['dtype']} peak"
        parts.append(part)
    print(f"mfu ({where}, {results[0]['dtype']}): {' | '.join(parts)} | {common.machine_state()}, "
          f"{time.perf_counter() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
