"""Runs several parallel layouts, one after another, inside one torchrun job (sharing the process
start-up), with the real Trainer. For each layout it writes the per-step losses (metrics.jsonl
from the Trainer) and the step-0 gradients gathered to full tensors under layout-independent
names, which tests/test_parallelism.py compares with a single-process run.

    torchrun --nproc_per_node N tests/parallel_harness.py OUT FAMILY T,P,Z[,VARIANT] [...]

A VARIANT (a key of VARIANTS) adds its overrides to that layout only; its run folder is
FAMILY-tpT-ppP-zZ-VARIANT, beside the plain layout's it is compared with.
"""

from __future__ import annotations

import gc
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

FAMILIES = {
    # NeoX style with tied embeddings (exercises TiedLayerSpec across pipeline stages).
    "neox": ["model.parallel_residual=true", "model.rotary_pct=0.5", "model.tie_embeddings=true"],
    # Llama style with grouped-query attention and an untied output layer.
    "llama": ["model.norm=rmsnorm", "model.activation=swiglu", "model.bias=false",
              "model.num_attention_heads=8", "model.num_kv_heads=4", "model.tie_embeddings=false"],
    # NeoX style trained on a blend of SFT data (per-token loss masks) and the embedded corpus,
    # with packed documents masked from each other (data.document_masking).
    "neox-sft-docmask": ["model.parallel_residual=true", "model.rotary_pct=0.5", "model.tie_embeddings=true",
                         "data.document_masking=true", "data.embedded=null", "data.weights=[0.6,0.4]"],
}


# Features that must not change the numbers, run as extra layouts of a family's job.
VARIANTS = {
    "recompute-full": ["model.recompute=full", "model.recompute_num_layers=2"],
    "recompute-selective": ["model.recompute=selective"],
    "sequence-parallel": ["parallelism.sequence_parallel=true"],
}


def layout_name(family: str, tensor: int, pipeline: int, zero: int, variant: str | None = None) -> str:
    """The run folder of one layout (and variant) of a family."""
    return f"{family}-tp{tensor}-pp{pipeline}-z{zero}" + (f"-{variant}" if variant else "")


def family_data(out: Path, family: str) -> list[str]:
    """Data overrides a family needs, prepared once by rank 0 (the SFT prefix and the embedded corpus)."""
    if "sft" not in family:
        return []
    from megatron_gpt.data.embedded import prepare_embedded
    from sft_data import preprocess_sft_corpus, sft_tokenizer

    sft, corpus = out / "sft" / "sft", out / "corpus"
    if dist.get_rank() == 0 and not corpus.exists():  # once per harness output folder
        preprocess_sft_corpus(out / "sft")
        corpus.write_text(prepare_embedded("shakespeare", str(out / "cache"), tokenizer=sft_tokenizer()))
    dist.barrier()
    return [f"data.paths=[{sft},{corpus.read_text()}]", "tokenizer.type=hf", f"tokenizer.path={sft_tokenizer().path}"]


def full_gradients(engine, model) -> dict[str, torch.Tensor]:
    """This stage's gradients, averaged over data ranks (DeepSpeed's own reduction, any ZeRO
    stage) and gathered over tensor ranks along each parameter's partition dimension."""
    from deepspeed.utils import safe_get_full_grad
    from megatron.core import parallel_state

    from megatron_gpt.model.names import canonical_names

    names = canonical_names(model)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    grads = {}
    for name, param in model.named_parameters():
        grad = safe_get_full_grad(param)  # collective under ZeRO-3: every rank calls it in order
        if grad is None:
            continue
        grad = grad.detach().float().clone()
        if tp > 1 and getattr(param, "tensor_model_parallel", False):
            pieces = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(pieces, grad.contiguous(), group=tp_group)
            grad = torch.cat(pieces, dim=param.partition_dim)
        grads[names[name]] = grad
    return grads


def record_recompute(layout_dir: Path, stage: int, counts) -> None:
    """recompute.json: per rank, its pipeline stage and how many block chunks / attention cores it
    checkpointed and reran (training.recompute.COUNTS), so a test sees that recompute really ran."""
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, {"stage": stage, **counts})
    if dist.get_rank() == 0:
        (layout_dir / "recompute.json").write_text(json.dumps(ranks))


def run_layout(out: Path, family: str, tensor: int, pipeline: int, zero: int, world: int,
               variant: str | None = None) -> None:
    from megatron.core import parallel_state

    from activation_bytes_sp import block_input_shapes
    from megatron_gpt.config import load_config
    from megatron_gpt.training import gradients, recompute
    from megatron_gpt.training.trainer import Trainer

    layout_dir = out / layout_name(family, tensor, pipeline, zero, variant)
    overrides = FAMILIES[family] + VARIANTS.get(variant, []) + [
        f"parallelism.tensor={tensor}", f"parallelism.pipeline={pipeline}", f"parallelism.zero_stage={zero}",
        f"launcher.nproc_per_node={world}", f"logging.run_dir={layout_dir}", f"data.cache_dir={out / 'cache'}",
        "training.train_steps=8", "training.global_batch_size=8", "training.micro_batch_size=2",
        "training.eval_iters=1", "checkpoint.save_dir=null",
    ]
    cfg = load_config([str(REPO / "tests" / "configs" / "tiny.yml")], overrides + family_data(out, family),
                      world_size=world)
    recompute.COUNTS.clear()
    trainer = Trainer(cfg)
    engine = trainer.engine
    if dist.get_rank() == 0:  # which code all-reduced the gradients (tests assert the intended one ran)
        (layout_dir / "gradient-sync.txt").write_text(trainer.gradients.reducer)
    take_step = engine._take_model_step  # the one place both engines pass through before stepping
    clip = gradients.clip_gradients  # where the trainer clips itself (fp32 without ZeRO), before that
    captured = []

    def capture() -> None:
        if engine.global_steps == 0 and not captured:  # the first step's gradients, before clipping
            grads = full_gradients(engine, trainer.model)
            if trainer.topo.tensor_rank == 0 and trainer.topo.data_rank == 0:
                torch.save(grads, layout_dir / f"grads-stage{trainer.topo.pipeline_rank}.pt")
            captured.append(True)

    def capture_then_step(*args, **kwargs):
        capture()
        return take_step(*args, **kwargs)

    def capture_then_clip(*args, **kwargs):
        capture()
        return clip(*args, **kwargs)

    engine._take_model_step = capture_then_step
    gradients.clip_gradients = capture_then_clip
    dist.barrier()
    try:
        with block_input_shapes() as shapes:  # proof of the layout the blocks really ran in
            trainer.run()
    finally:
        gradients.clip_gradients = clip
    record_recompute(layout_dir, trainer.topo.pipeline_rank, recompute.COUNTS)
    if dist.get_rank() == 0:
        (layout_dir / "block-input-shape.json").write_text(json.dumps(shapes[0] if shapes else None))
    trainer = engine = take_step = None  # closures hold these cells: free the model before the next layout
    gc.collect()
    dist.barrier()
    parallel_state.destroy_model_parallel()


def main() -> None:
    warnings.filterwarnings("ignore")
    out, family, layouts = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    from megatron_gpt.parallel.groups import init_distributed

    init_distributed(1, 1, "cpu")
    for layout in layouts:
        tensor, pipeline, zero, *variant = layout.split(",")
        run_layout(out, family, int(tensor), int(pipeline), int(zero), dist.get_world_size(), *variant)


if __name__ == "__main__":
    main()
