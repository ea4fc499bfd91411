"""load_checkpoint reads a checkpoint saved under any layout into the same single-process model.

Every layout trains like one process (tests/test_parallelism.py proves it within 1e-6 here), so
the checkpoints of one tiny run under three layouts, each rank writing its own pieces in the sharded
format, must merge into the same weights (within 1e-5) and give the same logits (within 1e-4):

- tp=1, pp=1, dp=1: one shard holding whole tensors;
- tp=2, pp=2: four shards, each a pipeline stage's tensor-parallel slices;
- tp=2, ZeRO-3, dp=2: four shards, each a data rank's flat partition of a tensor-parallel slice.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

STEPS = 3
LAYOUTS = {  # name: (overrides, ranks)
    "tp1-pp1-dp1": ([], 1),
    "tp2-pp2": (["parallelism.tensor=2", "parallelism.pipeline=2"], 4),
    "tp2-zero3-dp2": (["parallelism.tensor=2", "parallelism.zero_stage=3"], 4),
}
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value for name, value in model.state_dict().items() if isinstance(value, torch.Tensor)}


def test_every_layout_loads_into_the_same_model(train, tmp_path):
    from megatron_gpt.checkpoint.reader import CheckpointError, load_checkpoint
    from megatron_gpt.model import GPT, parallel_config

    loaded, folders = {}, {}
    for name, (overrides, ranks) in LAYOUTS.items():
        save_dir = tmp_path / f"checkpoints-{name}"
        train(*overrides, f"checkpoint.save_dir={save_dir}", f"training.train_steps={STEPS}", nproc=ranks, name=name)
        loaded[name] = load_checkpoint(str(save_dir))
        folders[name] = save_dir / f"global_step{STEPS}"

    # Each run wrote the form it is meant to exercise: one shard per rank, nothing pickled.
    assert [p.name for p in (folders["tp1-pp1-dp1"] / "shards").iterdir()] == ["rank00000.safetensors"]
    for name in ("tp2-pp2", "tp2-zero3-dp2"):
        assert len(list((folders[name] / "shards").glob("rank*.safetensors"))) == 4
    assert not [p for f in folders.values() for p in f.rglob("*.pt")]

    base = loaded["tp1-pp1-dp1"]
    base_tensors = tensors(base.model)
    tokens = torch.tensor([base.tokenizer.encode(TEXT)[:base.cfg.model.seq_length]])
    with torch.no_grad():
        base_logits = base.model(tokens)
    assert base_logits.shape[-1] == base.vocab_size == base.model.vocab_size  # the padded vocab, untrimmed

    # The weights are the trained ones, not a fresh initialization from the same seed.
    fresh = tensors(GPT(base.cfg.model, base.vocab_size, parallel_config(), seed=base.cfg.training.seed))
    assert max((fresh[k] - v).abs().max().item() for k, v in base_tensors.items()) > 1e-3

    report = []
    for name, other in loaded.items():
        assert other.step == STEPS
        assert not other.model.training
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in other.model.parameters())
        assert other.tokenizer.encode(TEXT) == base.tokenizer.encode(TEXT)
        assert other.cfg.parallelism.tensor == (1 if name == "tp1-pp1-dp1" else 2)
        state = tensors(other.model)
        assert state.keys() == base_tensors.keys()
        weight_error = max((state[k] - v).abs().max().item() for k, v in base_tensors.items())
        with torch.no_grad():
            logit_error = (other.model(tokens) - base_logits).abs().max().item()
        report.append(f"{name}: max weight diff {weight_error:.1e}, max logit diff {logit_error:.1e}")
        assert weight_error <= 1e-5, report[-1]
        assert logit_error <= 1e-4, report[-1]
    print("\n".join(report))

    # A tag, or the tag folder itself, names the same checkpoint; a wrong path says what to pass.
    save_dir = folders["tp2-pp2"].parent
    for again in (load_checkpoint(save_dir, tag=f"global_step{STEPS}"), load_checkpoint(folders["tp2-pp2"])):
        assert again.path == folders["tp2-pp2"]
        assert all(torch.equal(a, b) for a, b in zip(tensors(again.model).values(), tensors(loaded["tp2-pp2"].model).values()))
    with pytest.raises(CheckpointError, match="global_step"):
        load_checkpoint(tmp_path)
