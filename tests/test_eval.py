"""`megatron-gpt eval` runs lm-eval-harness tasks on a checkpoint, offline, scoring every document;
the lm-eval adapter's scores agree with the model's own log-probabilities."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml


pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yml"

TASKS_DIR = REPO / "megatron_gpt" / "inference" / "eval_tasks"
BUNDLED = {"shakespeare_next_line": "multiple_choice", "shakespeare_ppl": "loglikelihood_rolling",
           "shakespeare_complete": "generate_until"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def documents(task_yaml: Path) -> int:
    """Documents in a task's test split: lines of its local JSONL file."""
    data = yaml.safe_load(task_yaml.read_text())["dataset_kwargs"]["data_files"]["test"]
    path = Path(data) if Path(data).is_absolute() else task_yaml.parent / data
    return sum(1 for line in path.read_text().splitlines() if line.strip())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_cache) -> Path:
    """One tiny run (3 steps, one process) with a checkpoint, through the real CLI."""
    root = tmp_path_factory.mktemp("eval-run")
    save_dir = root / "checkpoints"
    command = [sys.executable, "-m", "megatron_gpt", "train", str(TINY), "--set", "launcher.nproc_per_node=1",
               "--set", f"data.cache_dir={data_cache}", "--set", f"logging.run_dir={root / 'run'}",
               "--set", f"checkpoint.save_dir={save_dir}", "--set", "training.train_steps=3"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return save_dir


def run_eval(checkpoint: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE, "HF_HOME": str(cwd / "hf-home"),  # an empty HF cache: nothing pre-fetched
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "megatron_gpt", "eval", str(checkpoint), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_eval_scores_every_document_offline(checkpoint, tmp_path):
    # A task of the user's own, added with --include-path (data_files absolute, as documented).
    user_tasks = tmp_path / "my_tasks"
    user_tasks.mkdir()
    user_data = user_tasks / "yes_no.jsonl"
    user_data.write_text("".join(json.dumps({"q": f"Is {n} even?", "label": n % 2}) + "\n" for n in range(5)))
    (user_tasks / "yes_no.yaml").write_text(yaml.safe_dump({
        "task": "my_yes_no", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(user_data)}},
        "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "{{q}}", "doc_to_choice": ["yes", "no"],
        "doc_to_target": "label", "metric_list": [{"metric": "acc"}]}))
    output = tmp_path / "out" / "results.json"
    done = run_eval(checkpoint, tmp_path, "--tasks", ",".join([*BUNDLED, "my_yes_no"]),
                    "--include-path", str(user_tasks), "--output", str(output))
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    results = json.loads(output.read_text())
    assert not list(output.parent.glob(".*.tmp"))  # the atomic write left no temporary behind

    expected = {name: documents(TASKS_DIR / f"{name}.yaml") for name in BUNDLED}
    expected["my_yes_no"] = documents(user_tasks / "yes_no.yaml")
    assert expected["shakespeare_next_line"] == 24 and expected["shakespeare_ppl"] == 8
    for task, count in expected.items():
        assert results["n-samples"][task] == {"original": count, "effective": count}, task
    for task, kind in BUNDLED.items():
        assert results["configs"][task]["output_type"] == kind

    scores = results["results"]
    assert 0.0 <= scores["shakespeare_next_line"]["acc,none"] <= 1.0
    assert 0.0 <= scores["shakespeare_next_line"]["acc_norm,none"] <= 1.0
    assert 0.0 <= scores["my_yes_no"]["acc,none"] <= 1.0
    assert 0.0 <= scores["shakespeare_complete"]["exact_match,none"] <= 1.0
    bits_per_byte = scores["shakespeare_ppl"]["bits_per_byte,none"]
    assert 0.5 < bits_per_byte < 12 and math.isfinite(scores["shakespeare_ppl"]["word_perplexity,none"])
    assert math.isclose(scores["shakespeare_ppl"]["byte_perplexity,none"], 2 ** bits_per_byte, rel_tol=1e-6)
    assert results["megatron_gpt"]["step"] == 3
    assert "shakespeare_ppl" in done.stdout  # the results table

    # --limit scores only the first N documents.
    limited = tmp_path / "limited.json"
    done = run_eval(checkpoint, tmp_path, "--tasks", "shakespeare_ppl", "--limit", "3", "--output", str(limited))
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert json.loads(limited.read_text())["n-samples"]["shakespeare_ppl"] == {"original": 8, "effective": 3}


@pytest.fixture(scope="module")
def lm(checkpoint):
    from megatron_gpt.inference.lm_eval_adapter import make_lm
    from megatron_gpt.checkpoint.reader import load_checkpoint

    return make_lm(load_checkpoint(checkpoint), batch_size=3)


def requests(*args) -> list[SimpleNamespace]:
    return [SimpleNamespace(args=a) for a in args]


def direct_logprob(model, ids: list[int], first_scored: int) -> float:
    """Sum of log p(ids[i] | ids[:i]) for i >= first_scored, from one forward pass."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids[:-1]])).float(), dim=-1)[0]
    return float(sum(log_probs[i - 1, ids[i]] for i in range(first_scored, len(ids))))


def test_adapter_scores_match_the_model(lm):
    tokenizer, model, eod = lm.tokenizer, lm.model, lm.tokenizer.eod
    text = "Now is the winter of our discontent\nMade glorious summer by this sun of York;"
    ids = tokenizer.encode(text)
    assert len(ids) < lm.max_length
    # loglikelihood_rolling of a short text: every token, the first one conditioned on EOD.
    (rolling,) = lm.loglikelihood_rolling(requests((text,)))
    assert rolling == pytest.approx(direct_logprob(model, [eod, *ids], 1), abs=1e-3)

    # A text longer than the context is scored in windows of max_length predictions, every token
    # exactly once, each window conditioned on the token before it (the last on a full context).
    long_ids = tokenizer.encode(" ".join([text] * 12))
    length, n = lm.max_length, len(long_ids)
    assert n > 2 * length and n % length
    full = [eod, *long_ids]
    expected = 0.0
    for start in range(0, n, length):
        end = min(start + length, n)
        first = max(0, end - length)
        expected += direct_logprob(model, full[first:end + 1], start + 1 - first)
    (long_rolling,) = lm.loglikelihood_rolling(requests((tokenizer.decode(long_ids),)))
    assert tokenizer.encode(tokenizer.decode(long_ids)) == long_ids
    assert long_rolling == pytest.approx(expected, abs=1e-2)

    # Batched and padded requests give the one-at-a-time scores.
    pairs = [("Now is the winter", " of our discontent"), ("", "Made glorious"), ("A horse! ", "a horse!"),
             ("To be, or not to be,", " that is the question"), ("O", " Romeo")]
    batched = lm.loglikelihood(requests(*pairs))
    single = [lm.loglikelihood(requests(pair))[0] for pair in pairs]
    for (a, greedy_a), (b, greedy_b) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    context = tokenizer.encode("Now is the winter")
    whole = tokenizer.encode("Now is the winter of our discontent")
    assert batched[0][0] == pytest.approx(direct_logprob(model, whole, len(context)), abs=1e-3)


def test_adapter_generates_greedily_until_a_stop_string(lm):
    from megatron_gpt.model.sampling import sample

    prompt = "ROMEO.\nBut soft, what light"
    (free,) = lm.generate_until(requests((prompt, {"until": ["\x00"], "max_gen_toks": 24})))
    expected = lm.tokenizer.decode(sample(lm.model, lm.tokenizer.encode(prompt), 24, lm.max_length,
                                          lm.tokenizer.vocab_size, temperature=0))
    eod_text = lm.tokenizer.decode([lm.tokenizer.eod])
    assert expected.startswith(free) and (free == expected or expected[len(free):].startswith(eod_text))
    stop = free.strip()[:2] if free.strip() else "\n"
    (cut,) = lm.generate_until(requests((prompt, {"until": [stop], "max_gen_toks": 24})))
    assert stop not in cut and free.startswith(cut)
