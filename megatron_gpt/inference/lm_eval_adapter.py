"""lm-eval-harness over a checkpoint (the `eval` extra): score it on lm-eval-harness tasks (the `eval` extra).

    megatron-gpt eval checkpoints/run --tasks shakespeare_next_line,shakespeare_ppl --output results.json

The checkpoint is loaded as one single-process model (megatron_gpt.checkpoint.reader, any training
layout) and wrapped in an lm-eval `LM`: loglikelihood and loglikelihood_rolling score token
log-probabilities from batched forward passes, generate_until decodes with
megatron_gpt.model.sampling. Tasks come from lm-eval's own registry, from the tasks bundled in
megatron_gpt/inference/eval_tasks, and from every `--include-path DIR` (lm-eval task YAMLs; local data via
`dataset_path: json` + `dataset_kwargs: {data_files: ...}`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from megatron_gpt.checkpoint.reader import load_checkpoint
from megatron_gpt.inference.eval_tasks import BUNDLED_TASKS
from megatron_gpt.model.sampling import SamplingOptions, generate

try:
    from lm_eval.api.model import LM
except ImportError as error:  # an optional extra: the CLI turns this into one line
    raise ImportError("`megatron-gpt eval` needs lm-eval; fix: pip install -e \".[eval]\" "
                      f"(or pip install lm-eval) ({error})") from error


def make_lm(loaded, batch_size: int = 8, max_gen_toks: int = 256) -> "MegatronGPTLM":
    """An lm-eval `LM` over a megatron_gpt checkpoint loaded by checkpoint.reader.load_checkpoint."""
    return MegatronGPTLM(loaded, batch_size=batch_size, max_gen_toks=max_gen_toks)


class MegatronGPTLM(LM):
    """lm-eval's model interface over a single-process megatron_gpt GPT.

    Log-probabilities are the model's softmax over its whole (padded) vocabulary, the same
    distribution its training loss uses. Requests longer than the model's context keep
    their last `seq_length` tokens (rolling windows for loglikelihood_rolling)."""

    def __init__(self, loaded, batch_size: int = 8, max_gen_toks: int = 256):
        super().__init__()
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        self.max_length = loaded.cfg.model.seq_length
        self.batch_size = max(1, int(batch_size))
        self.max_gen_toks = max_gen_toks
        self._device = torch.device("cpu")

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def tokenizer_name(self) -> str:
        return f"megatron_gpt:{self.tokenizer.config.type}"

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As lm-eval's HF model: trailing spaces of the context move to the continuation,
        and the continuation's tokens are those of the whole text after the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.eot_token_id], self.tok_encode(continuation)
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        return context_ids, whole[len(context_ids):]

    @torch.inference_mode()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether greedy decoding gives it)."""
        rows = []
        for context, continuation in pairs:
            ids = (context + continuation)[-(self.max_length + 1):]
            inputs = ids[:-1]
            scored = min(len(continuation), len(inputs))
            rows.append((inputs, ids[len(ids) - scored:]))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths together
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = max(len(rows[i][0]) for i in batch)
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                tokens[row, :len(rows[i][0])] = torch.tensor(rows[i][0])
            # Over the tokenizer's vocabulary, as training (which hides the padding ids' logits).
            logits = self.model(tokens)[..., : self.tokenizer.vocab_size]
            log_probs = F.log_softmax(logits.float(), dim=-1)  # right padding: causal, unseen
            for row, i in enumerate(batch):
                inputs, targets = rows[i]
                if not targets:
                    results[i] = (0.0, True)
                    continue
                span = log_probs[row, len(inputs) - len(targets):len(inputs)]
                target = torch.tensor(targets)
                logprob = float(span.gather(1, target[:, None]).sum())
                results[i] = (logprob, bool((span.argmax(dim=-1) == target).all()))
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args) for request in requests]
        results = self._score(pairs)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for index, request in enumerate(requests):
            (text,) = request.args[:1]
            for window in get_rolling_token_windows(self.tok_encode(text), prefix_token=self.eot_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._score(windows)):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _generate(self, prompt: list[int], max_new: int, temperature: float, stop: list[str]) -> list[int]:
        options = SamplingOptions(max_new_tokens=max_new, temperature=temperature, top_k=None,
                                  stop=tuple(stop), stop_ids=(self.eot_token_id,), seed=0)
        return generate(self.model, prompt, options, self.tokenizer.vocab_size, self.max_length,
                        decode=self.tokenizer.decode)

    def generate_until(self, requests) -> list[str]:
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            max_new = max(1, min(max_new, self.max_length - 1))
            temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
            prompt = (self.tok_encode(context) or [self.eot_token_id])[-(self.max_length - max_new):]
            new = self._generate(prompt, max_new, temperature, until)
            if self.eot_token_id in new:
                new = new[:new.index(self.eot_token_id)]
            text = self.tokenizer.decode(new)
            for stop in until:  # cut at the first stop string (the sampler may stop after it)
                if stop and stop in text:
                    text = text[:text.index(stop)]
            self.cache_hook.add_partial("generate_until", request.args, text)
            outputs.append(text)
        return outputs




# --------------------------------------------------------------------------- tasks and the command


def _bundled_task_dir(into: Path) -> Path:
    """The bundled task YAMLs with their `data_files` made absolute (the `datasets` library reads
    relative data paths from the current directory, not from the YAML's folder)."""
    import yaml

    for source in sorted(BUNDLED_TASKS.glob("*.yaml")):
        task = yaml.safe_load(source.read_text())
        files = task.get("dataset_kwargs", {}).get("data_files", {})
        task["dataset_kwargs"]["data_files"] = {split: str(BUNDLED_TASKS / name) for split, name in files.items()}
        (into / source.name).write_text(yaml.safe_dump(task, sort_keys=False))
    return into


class UnknownTaskError(ValueError):
    """A task name found neither in lm-eval's registry nor in the include paths."""


def task_manager(task_names: list[str], include_paths: list[str], bundled: Path):
    """lm-eval's TaskManager over the bundled tasks and `include_paths`; lm-eval's own few thousand
    task configs are indexed (about 15 s) only when a requested task is not found among those."""
    from lm_eval.tasks import TaskManager

    paths = [str(bundled), *include_paths]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(name in manager.all_tasks for name in task_names):
        return manager
    manager = TaskManager(include_path=paths, include_defaults=True)
    unknown = [name for name in task_names if name not in manager.all_tasks and not Path(name).is_file()]
    if unknown:
        raise UnknownTaskError(f"unknown task {', '.join(unknown)}; fix: check --tasks (`lm-eval ls tasks` lists "
                               "lm-eval's own), or add the folder of its YAML with --include-path")
    return manager


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2, ensure_ascii=False, default=handle_non_serializable)
            out.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def evaluate_checkpoint(checkpoint: str, tasks: list[str], include_paths: list[str] = (), tag: str | None = None,
                        limit: int | float | None = None, batch_size: int = 8, num_fewshot: int | None = None,
                        bootstrap_iters: int = 1000, log_samples: bool = False, tokenizer: str | None = None) -> dict:
    """Load `checkpoint` and run lm-eval's simple_evaluate on `tasks`; returns lm-eval's results
    dict plus a `megatron_gpt` entry (checkpoint folder, step, load and evaluation seconds)."""
    from lm_eval import simple_evaluate


    with tempfile.TemporaryDirectory(prefix="megatron-gpt-tasks-") as bundled:
        manager = task_manager(tasks, list(include_paths), _bundled_task_dir(Path(bundled)))
        started = time.perf_counter()
        loaded = load_checkpoint(checkpoint, tag, tokenizer)
        loaded_at = time.perf_counter()
        results = simple_evaluate(
            model=make_lm(loaded, batch_size=batch_size), tasks=tasks, num_fewshot=num_fewshot, limit=limit,
            task_manager=manager, bootstrap_iters=bootstrap_iters, log_samples=log_samples)
    if results is None:  # only non-zero ranks get None; this is a single process
        raise RuntimeError("lm-eval returned no results")
    results = dict(results)
    results["megatron_gpt"] = {
        "checkpoint": str(loaded.path.resolve()), "step": loaded.step, "config_name": loaded.cfg.name,
        "load_seconds": round(loaded_at - started, 2), "eval_seconds": round(time.perf_counter() - loaded_at, 2),
    }
    return results
