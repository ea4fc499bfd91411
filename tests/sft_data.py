"""Small SFT corpora for tests: a ChatML chat template and synthetic conversations and
prompt/completion pairs, preprocessed with the embedded tokenizer (nothing downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("king queen love night death crown sword sweet gentle lord lady heaven honour fair speak hence "
         "tongue heart blood grave thou thee art dost noble villain fool wit").split()


def write_sft_corpus(folder: Path, conversations: int = 160, pairs: int = 80, seed: int = 0) -> tuple[Path, Path, Path]:
    """(conversations.jsonl, pairs.jsonl, chatml.jinja) under `folder`."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def phrase(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    with open(folder / "conversations.jsonl", "w") as f:
        for _ in range(conversations):
            messages = [{"role": "system", "content": "Answer in verse."}]
            for _ in range(rng.randint(1, 3)):
                messages += [{"role": "user", "content": f"Tell me of {phrase(rng.randint(1, 4))}."},
                             {"role": "assistant", "content": phrase(rng.randint(3, 12)).capitalize() + "."}]
            f.write(json.dumps({"messages": messages}) + "\n")
    with open(folder / "pairs.jsonl", "w") as f:
        for _ in range(pairs):
            f.write(json.dumps({"prompt": f"Q: {phrase(3)}?\nA:", "completion": f" {phrase(rng.randint(2, 8))}"}) + "\n")
    template = folder / "chatml.jinja"
    template.write_text(CHATML)
    return folder / "conversations.jsonl", folder / "pairs.jsonl", template


def sft_tokenizer():
    """The bundled Shakespeare BPE as an `hf` tokenizer (data.paths need a tokenizer of their own)."""
    from megatron_gpt.config.schema import TokenizerConfig
    from megatron_gpt.data.tokenizer import EMBEDDED_TOKENIZER_PATH

    return TokenizerConfig(type="hf", path=str(EMBEDDED_TOKENIZER_PATH))


def preprocess_sft_corpus(folder: Path, **sizes: int) -> str:
    """An SFT prefix (conversations and pairs in one dataset) made with `sft_tokenizer()`."""
    from megatron_gpt.data.sft import ChatTemplate, preprocess_sft
    from megatron_gpt.data.tokenizer import build_tokenizer

    conversations, pairs, template = write_sft_corpus(folder, **sizes)
    prefix = str(folder / "sft")
    preprocess_sft([str(conversations), str(pairs)], prefix, build_tokenizer(sft_tokenizer()),
                   ChatTemplate.load(str(template), None))
    return prefix
