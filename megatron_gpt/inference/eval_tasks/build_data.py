"""Rebuilds the bundled evaluation data from the embedded Shakespeare corpus (deterministic):

    python -m megatron_gpt.inference.eval_tasks.build_data

- shakespeare_next_line.jsonl: two lines of verse, then the true next line among four choices
  (the other three are lines of similar length from other works).
- shakespeare_passages.jsonl: passages of about 1,500 characters, one per work, for perplexity.
- shakespeare_complete.jsonl: two lines and the first half of a third; the target is its rest.

The texts are from the corpus the quickstart trains on, so these tasks measure how well a model
fits that corpus and prove the evaluation path end to end; they are not a general benchmark.
"""

from __future__ import annotations

import json
import lzma
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "data" / "assets" / "shakespeare.jsonl.xz"


def _verse_runs(text: str) -> list[list[str]]:
    """Runs of consecutive lines inside speeches (no blank line, no speaker heading)."""
    runs, run = [], []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.isupper() or line.endswith(".") and line[:-1].isupper() or line.startswith(("[", "Enter", "Exit", "Exeunt")):
            if len(run) >= 3:
                runs.append(run)
            run = []
        else:
            run.append(line)
    return runs


def _good(line: str) -> bool:
    return 30 <= len(line) <= 70 and len(line.split()) >= 6


def main() -> None:
    rng = random.Random(0)
    works = [json.loads(line) for line in lzma.open(CORPUS, "rt", encoding="utf-8")]
    runs = {w["title"]: _verse_runs(w["text"]) for w in works}
    lines = [(title, line) for title, rs in runs.items() for r in rs for line in r if _good(line)]
    titles = sorted(t for t, rs in runs.items() if len(rs) > 50)

    def triple(title: str) -> list[str]:
        while True:
            run = rng.choice(runs[title])
            start = rng.randrange(len(run) - 2)
            picked = run[start:start + 3]
            if all(_good(x) for x in picked):
                return picked

    next_line = []
    for title in rng.sample(titles, 24):
        first, second, answer = triple(title)
        distractors = []
        while len(distractors) < 3:
            other_title, other = rng.choice(lines)
            if other_title != title and abs(len(other) - len(answer)) < 15 and other not in distractors:
                distractors.append(other)
        label = rng.randrange(4)
        choices = distractors[:label] + [answer] + distractors[label:]
        next_line.append({"work": title, "context": f"{first}\n{second}", "choices": choices, "label": label})

    passages = []
    for work in rng.sample([w for w in works if len(w["text"]) > 20000], 8):
        text = work["text"]
        start = text.index("\n\n", rng.randrange(len(text) // 4, len(text) - 4000)) + 2
        end = text.index("\n\n", start + 1500)
        passages.append({"work": work["title"], "text": text[start:end]})

    complete = []
    for title in rng.sample(titles, 12):
        first, second, third = triple(title)
        words = third.split(" ")
        cut = len(words) // 2
        complete.append({"work": title, "context": f"{first}\n{second}\n{' '.join(words[:cut])}",
                         "target": " " + " ".join(words[cut:])})

    for name, docs in [("shakespeare_next_line", next_line), ("shakespeare_passages", passages),
                       ("shakespeare_complete", complete)]:
        with open(HERE / f"{name}.jsonl", "w", encoding="utf-8") as out:
            out.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)


if __name__ == "__main__":
    main()
