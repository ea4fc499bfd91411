"""Generation: the KV cache changes speed, never tokens."""

from __future__ import annotations


import pytest
import torch

from megatron_gpt.config.schema import ModelConfig
from megatron_gpt.model.sampling import SamplingOptions, generate
from megatron_gpt.model import GPT, KVCache, parallel_config

VOCAB = 128
FAMILIES = {
    "neox": dict(parallel_residual=True, rotary_pct=0.25, tie_embeddings=False),
    "llama": dict(norm="rmsnorm", activation="swiglu", bias=False, num_kv_heads=2, tie_embeddings=False),
    "gpt2": dict(position_embedding="learned"),
}


pytestmark = pytest.mark.usefixtures("single_process_group")


def model(family: str) -> GPT:
    # A wide init makes the logits peaked, so greedy choices are not near-ties.
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=96, init_std=0.3,
                      **FAMILIES[family])
    return GPT(cfg, VOCAB, parallel_config(), seed=5)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_cache_equals_without(family):
    gpt = model(family)
    prompt = [3, 17, 42, 99, 7, 64, 1, 5]
    options = SamplingOptions(max_new_tokens=50, temperature=0)
    cached = generate(gpt, prompt, options, VOCAB, 96, use_cache=True)
    uncached = generate(gpt, prompt, options, VOCAB, 96, use_cache=False)
    assert len(cached) == 50 and cached == uncached
    assert len(set(cached)) > 3  # not a degenerate repetition of one token


@pytest.mark.parametrize("family", FAMILIES)
def test_chunk_after_cache_equals_full_forward(family):
    """A multi-token chunk after cached tokens (the explicitly masked path) gives the same logits
    as one forward over the whole sequence."""
    gpt = model(family).eval()
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = gpt(tokens)
        cache = KVCache()
        first = gpt(tokens[:, :25], cache)
        second = gpt(tokens[:, 25:], cache)
    assert cache.length == 40
    assert torch.allclose(torch.cat([first, second], dim=1), full, atol=1e-5)


def test_sampling_options():
    gpt = model("llama")
    prompt = [1, 2, 3]
    greedy = generate(gpt, prompt, SamplingOptions(max_new_tokens=10, temperature=0), VOCAB, 96)
    assert generate(gpt, prompt, SamplingOptions(max_new_tokens=10, temperature=1.0, top_k=1), VOCAB, 96) == greedy
    a = generate(gpt, prompt, SamplingOptions(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3), VOCAB, 96)
    b = generate(gpt, prompt, SamplingOptions(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3), VOCAB, 96)
    assert a == b  # seeded
    stopped = generate(gpt, prompt, SamplingOptions(max_new_tokens=10, temperature=0, stop_ids=(greedy[3],)),
                       VOCAB, 96)
    assert stopped == greedy[:greedy.index(greedy[3])]
    text = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    cut = generate(gpt, prompt, SamplingOptions(max_new_tokens=10, temperature=0, stop=(f"<{greedy[2]}>",)),
                   VOCAB, 96, decode=text)
    assert cut == greedy[:greedy.index(greedy[2])]
    penalized = generate(gpt, prompt, SamplingOptions(max_new_tokens=30, temperature=0, repetition_penalty=5.0),
                         VOCAB, 96)
    assert len(set(penalized)) >= len(set(generate(gpt, prompt, SamplingOptions(max_new_tokens=30, temperature=0),
                                                   VOCAB, 96)))


@pytest.mark.slow
def test_generate_command_on_a_tensor_parallel_checkpoint(train, tmp_path, capsys):
    """`megatron-gpt generate` on a tp=2 checkpoint: prompt and prompt-file modes, and the KV
    cache gives the same greedy text as recomputing the context."""
    import json

    from megatron_gpt.cli import main

    ckpt = tmp_path / "ckpt"
    train("parallelism.tensor=2", f"checkpoint.save_dir={ckpt}", "training.train_steps=6", nproc=2)
    greedy = ["generate", str(ckpt), "--temperature", "0", "--max-new-tokens", "20", "--no-stop-at-eod"]
    assert main(greedy + ["--prompt", "ROMEO:"]) == 0
    cached = capsys.readouterr().out
    assert main(greedy + ["--prompt", "ROMEO:", "--no-cache"]) == 0
    assert capsys.readouterr().out == cached and cached.startswith("ROMEO:") and len(cached) > len("ROMEO:\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "ROMEO:"}) + "\n" + json.dumps({"prompt": "JULIET:"}) + "\n")
    assert main(greedy + ["--prompt-file", str(prompts), "--output", str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["ROMEO:", "JULIET:"]
    assert rows[0]["prompt"] + rows[0]["completion"] + "\n" == cached
