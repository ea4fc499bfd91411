#!/usr/bin/env bash
# One-GPU benchmark: GPT-3-shaped 125M / 350M / 1.3B models (2048 tokens, GPT-2's padded
# vocabulary of 50,304) trained by the full stack (DeepSpeed engine, ZeRO-1, our data path) in
# bf16 with SDPA attention (flash-attn's kernel when it is installed), printing tokens/s, model
# TFLOP/s and MFU against the GPU's dense bf16 peak, with a bf16 matmul measured beside it; then
# each model.recompute mode's peak memory against the memory plan (bench/memory.py).
#
#   bash bench/gpu.sh                       # all three sizes
#   SIZES=125m bash bench/gpu.sh            # one size; PYTHON=..., EXTRA="--windows 3" also work
#   MEMORY_SIZES=125m bash bench/gpu.sh     # sizes of the recompute/memory-plan part (default 125m,1.3b)
#
# Needs a Python with a CUDA build of torch and this package's dependencies (pip install -e .);
# nothing is downloaded at run time (the corpus is the embedded one, prepared into the cache).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
SIZES=${SIZES:-125m,350m,1.3b}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "bench/gpu.sh: $PYTHON has no CUDA-enabled torch or sees no GPU; nothing to measure" >&2
    exit 2
fi
if ! "$PYTHON" -c "import deepspeed, megatron.core, megatron_gpt" 2>/dev/null; then
    echo "bench/gpu.sh: installing this package into $PYTHON (pip install -e .)" >&2
    "$PYTHON" -m pip install -q -e . >&2
fi
"$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); \
print(f'gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}')" >&2
"$PYTHON" -c "import flash_attn" 2>/dev/null && echo "attention: flash-attn" >&2 || echo "attention: torch SDPA" >&2
export DS_ACCELERATOR=cuda PYTHONWARNINGS=ignore
# shellcheck disable=SC2086
"$PYTHON" bench/mfu.py --device cuda --precision bf16 --sizes "$SIZES" ${EXTRA:-}
# Peak memory of each recompute mode against `megatron-gpt layout`'s plan, and what each costs in tokens/s.
exec "$PYTHON" bench/memory.py --precision bf16 --sizes "${MEMORY_SIZES:-125m,1.3b}"
