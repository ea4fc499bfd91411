"""Completing prompts with a loaded checkpoint: one prompt, a file of prompts, or a stream."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_gpt.checkpoint.reader import Loaded
from megatron_gpt.model.sampling import SamplingOptions, generate


def read_prompts(path: str) -> list[str]:
    """JSONL with a "prompt" (or "text") field per line, or plain text with one prompt per line."""
    prompts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            try:
                record = json.loads(line)
                prompts.append(record["prompt"] if "prompt" in record else record["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: expected a JSON object with a \"prompt\" field ({error}); "
                                 "fix: write one {\"prompt\": \"...\"} per line") from error
        else:
            prompts.append(line)
    return prompts


@dataclass(frozen=True)
class Completer:
    """Text after a prompt, sampled from `loaded` with `options` (KV cache unless `use_cache` is off)."""

    loaded: Loaded
    options: SamplingOptions
    use_cache: bool = True

    def __call__(self, prompt: str) -> str:
        tokenizer = self.loaded.tokenizer
        ids = generate(self.loaded.model, tokenizer.encode(prompt), self.options, tokenizer.vocab_size,
                       self.loaded.context_length, use_cache=self.use_cache, decode=tokenizer.decode)
        return tokenizer.decode(ids)

    def write_completions(self, prompts: list[str], output: Path) -> None:
        """One {"prompt", "completion"} line per prompt, written to a temporary file, then renamed."""
        temporary = output.with_name(f".{output.name}.tmp{os.getpid()}")
        with temporary.open("w", encoding="utf-8") as handle:
            for prompt in prompts:
                handle.write(json.dumps({"prompt": prompt, "completion": self(prompt)}) + "\n")
        os.replace(temporary, output)
