"""End to end through the CLI: training on a weighted blend of preprocessed datasets, stopped and
resumed from its checkpoint, takes exactly the steps of an uninterrupted run."""

from __future__ import annotations

import json
import lzma

import pytest

from megatron_gpt.config.schema import TokenizerConfig
from megatron_gpt.data.embedded import embedded_corpus_path
from megatron_gpt.data.preprocess import preprocess
from megatron_gpt.data.tokenizer import EMBEDDED_TOKENIZER_PATH, build_tokenizer

pytestmark = pytest.mark.slow


def test_blended_resume_is_exact(train, tmp_path):
    docs = [json.loads(line) for line in lzma.open(embedded_corpus_path("shakespeare"), "rt", encoding="utf-8")]
    tokenizer = build_tokenizer(TokenizerConfig(type="hf", path=str(EMBEDDED_TOKENIZER_PATH)))
    prefixes = []
    for name, part in (("plays", docs[:30]), ("rest", docs[30:])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in part))
        preprocess([str(path)], str(tmp_path / name), tokenizer, workers=2, progress=False)
        prefixes.append(str(tmp_path / name))
    data = ["data.embedded=null", f"data.paths=[{', '.join(prefixes)}]", "data.weights=[0.7, 0.3]",
            "tokenizer.type=hf", f"tokenizer.path={EMBEDDED_TOKENIZER_PATH}", "training.train_steps=8"]
    ckpt = tmp_path / "ckpt"
    straight = train(*data, name="straight").losses()
    first = train(*data, "training.train_steps=4", f"checkpoint.save_dir={ckpt}", name="first").losses()
    second = train(*data, f"checkpoint.save_dir={ckpt}", name="second")
    assert "steps 4->8" in second.output
    resumed = {**first, **second.losses()}
    assert sorted(resumed) == sorted(straight) == list(range(1, 9))
    print("max |loss(straight) - loss(resumed)|:", max(abs(straight[s] - resumed[s]) for s in straight))
    for step in straight:
        assert abs(straight[step] - resumed[step]) <= 1e-6, (step, straight[step], resumed[step])
