"""Supervised finetuning data: conversations and prompt/completion pairs -> an indexed dataset
plus a per-token loss mask beside it.

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    {"prompt": "Translate: chat ->", "completion": " cat"}

A conversation is rendered with the tokenizer's chat template (tokenizer_config.json's
`chat_template`, or a Jinja file) in a sandboxed Jinja environment, as transformers renders it.
Each assistant turn's span is what rendering the conversation through that turn adds after
rendering the turns before it with the generation prompt: the reply and the template's end of
turn, not the `assistant` header. The text is tokenized span by span, so every token belongs to
exactly one span, and the mask is 1 on the tokens of trained spans (assistant turns; the
completion), 0 elsewhere. The end-of-document token after each example is trained when the last
span is.

Written: PREFIX.bin/.idx (token ids, the usual format) and PREFIX.loss_mask.bin/.idx (uint8, one
value per token, the same document lengths), plus PREFIX.meta.json. Training reads the mask
whenever it sits beside a prefix (`loss_mask_twin`).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from megatron_gpt.data.errors import DataError
from megatron_gpt.data.indexed import IndexedWriter, open_indexed, token_dtype
from megatron_gpt.data.reader import CorpusReader, expand_inputs

MASK_SUFFIX = ".loss_mask"
"""The mask dataset of PREFIX is PREFIX.loss_mask.bin/.idx."""


def mask_prefix(prefix: str) -> str:
    return prefix + MASK_SUFFIX


class ChatTemplate:
    """A Jinja chat template rendered as transformers renders it (sandboxed: a template from
    someone else cannot reach Python objects or files)."""

    def __init__(self, source: str, special: Optional[dict[str, str]] = None, origin: str = "chat template") -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        self.origin = origin
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise DataError(f"{origin}: not a valid Jinja template ({e}); fix: correct the template") from None
        self.special = dict(special or {})

    @classmethod
    def load(cls, template_file: Optional[str], tokenizer_config: Optional[str]) -> Optional["ChatTemplate"]:
        """From a Jinja file, else from tokenizer_config.json's chat_template (with its bos/eos);
        None when neither gives one (then only prompt/completion examples can be read)."""
        special: dict[str, str] = {}
        config: dict[str, Any] = {}
        if tokenizer_config and os.path.isfile(tokenizer_config):
            with open(tokenizer_config, encoding="utf-8") as f:
                config = json.load(f)
            for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
                value = config.get(name)
                special[name] = value.get("content", "") if isinstance(value, dict) else (value or "")
        if template_file:
            return cls(Path(template_file).read_text(encoding="utf-8"), special, template_file)
        source = config.get("chat_template")
        if isinstance(source, list):  # several named templates: the default one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not source:
            return None
        return cls(source, special, f"{tokenizer_config}:chat_template")

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)
        except TemplateError as e:
            raise DataError(f"{self.origin}: rendering failed ({e})") from None

    def spans(self, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, trained) spans: assistant replies trained."""
        full = self.render(messages, add_generation_prompt=False)
        spans: list[tuple[str, bool]] = []
        done = 0
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1], add_generation_prompt=False)
            if not (full.startswith(through) and through.startswith(before) and len(before) >= done):
                raise DataError(f"{self.origin}: rendering the turns before assistant turn {i} is not a prefix of the "
                                "whole conversation, so its span cannot be found; fix: use a template whose output "
                                "grows turn by turn")
            spans += [(full[done:len(before)], False), (through[len(before):], True)]
            done = len(through)
        spans.append((full[done:], False))
        return [(text, trained) for text, trained in spans if text]


def example_spans(doc: dict[str, Any], template: Optional[ChatTemplate], where: str) -> list[tuple[str, bool]]:
    """(text, trained) spans of one JSONL example (`messages`, or `prompt` + `completion`)."""
    if "messages" in doc:
        messages = doc["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise DataError(f"{where}: 'messages' must be a list of {{\"role\": str, \"content\": str}}; fix: correct it")
        if template is None:
            raise DataError(f"{where}: a conversation needs a chat template; fix: pass --chat-template FILE.jinja or "
                            "--tokenizer-config with a chat_template (tokenizer_config.json beside the tokenizer)")
        return template.spans(messages)
    if isinstance(doc.get("prompt"), str) and isinstance(doc.get("completion"), str):
        return [(text, trained) for text, trained in ((doc["prompt"], False), (doc["completion"], True)) if text]
    raise DataError(f"{where}: expected 'messages' (a conversation) or string 'prompt' and 'completion' "
                    f"(keys: {', '.join(sorted(doc)[:8]) or 'none'}); fix: write one of the two forms")


def tokenize_spans(tokenizer: Any, spans: Sequence[tuple[str, bool]], append_eod: bool = True
                   ) -> tuple[list[int], list[int]]:
    """Token ids and the 0/1 loss mask of each token (span by span; EOD trained when the last span is)."""
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in spans:
        piece = tokenizer.encode(text)
        ids += piece
        mask += [int(trained)] * len(piece)
    if append_eod and ids:
        ids.append(tokenizer.eod)
        mask.append(int(spans[-1][1]))
    return ids, mask


def _examples(paths: Sequence[str]) -> Iterator[tuple[dict[str, Any], str]]:
    reader = CorpusReader(paths, ["messages"])  # for its decompressing open only
    for path in expand_inputs(paths):
        with reader._open(path) as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    doc = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise DataError(f"{where}: invalid UTF-8; fix: re-encode the file as UTF-8") from None
                except json.JSONDecodeError as e:
                    if not raw.strip():
                        continue
                    raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); fix: make every line "
                                    "one complete JSON object") from None
                if not isinstance(doc, dict):
                    raise DataError(f"{where}: expected a JSON object; fix: write one example per line")
                yield doc, where


def preprocess_sft(inputs: Sequence[str], output_prefix: str, tokenizer: Any, template: Optional[ChatTemplate],
                   append_eod: bool = True) -> dict[str, int]:
    """Tokenize SFT examples into OUTPUT.bin/.idx + OUTPUT.loss_mask.bin/.idx (+ meta); counts."""
    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    counts = {"examples": 0, "tokens": 0, "trained_tokens": 0}
    with IndexedWriter(output_prefix, dtype) as tokens_out, IndexedWriter(mask_prefix(output_prefix), np.uint8) as masks_out:
        for doc, where in _examples(inputs):
            ids, mask = tokenize_spans(tokenizer, example_spans(doc, template, where), append_eod)
            if not ids:
                continue
            tokens_out.add(np.asarray(ids, dtype=dtype), np.asarray([len(ids)]))
            masks_out.add(np.asarray(mask, dtype=np.uint8), np.asarray([len(mask)]))
            counts["examples"] += 1
            counts["tokens"] += len(ids)
            counts["trained_tokens"] += sum(mask)
        if not counts["examples"]:
            raise DataError(f"{', '.join(inputs)}: no example; fix: give JSONL files with 'messages' or "
                            "'prompt'/'completion' lines")
        tok = tokenizer.config.model_dump(exclude_none=True)
        for field in ("path", "vocab_file", "merge_file", "cache_dir"):
            if field in tok:
                tok[field] = os.path.abspath(tok[field])
        meta = {"format": "megatron-gpt preprocess-sft", "version": 1, "tokenizer": tok,
                "tokenizer_id": tokenizer.unique_identifiers, "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod,
                "append_eod": append_eod, "dtype": dtype.name, "loss_mask": mask_prefix(os.path.basename(output_prefix)),
                "inputs": [os.path.abspath(p) for p in inputs], "documents": counts["examples"], **counts}
        masks_out.commit()  # the mask first: a prefix whose .idx exists always has its mask
        tokens_out.commit(meta)
    return counts


def loss_mask_twin(dataset: Any, prefix: str) -> Optional[Any]:
    """A copy of GPTDataset `dataset` (same index maps) reading PREFIX.loss_mask instead of the
    tokens, or None when the prefix has no mask. Its samples align token by token with the
    dataset's; a mask whose documents differ in length is an error naming the file."""
    masks = mask_prefix(prefix)
    if not os.path.isfile(masks + ".idx"):
        return None
    checked = open_indexed(masks, f"{prefix}'s loss mask")
    tokens = open_indexed(prefix)
    if not np.array_equal(checked.sequence_lengths, tokens.sequence_lengths):
        raise DataError(f"{masks}.idx: its documents differ in length from {prefix}.idx, so it is not this dataset's "
                        "loss mask; fix: preprocess the SFT data again (both are written together)")
    twin = copy.copy(dataset)
    twin.dataset = type(dataset).build_low_level_dataset(masks, dataset.config)
    return twin
