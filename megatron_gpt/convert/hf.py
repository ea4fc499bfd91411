"""Hugging Face export and import.

    export_hf("checkpoints/run", "hf/run", arch="llama", dtype="bf16")
    import_hf("hf/llama", "imported/llama", tensor=2, pipeline=2)

Export reads a checkpoint saved under any layout (tensor/pipeline/data parallel, ZeRO 0-3: the
shards are merged by `megatron_gpt.checkpoint.reader.load_checkpoint`), or a layout-independent folder
(an `import-hf` output), maps the canonical state dict through the architecture's adapter, cuts
the padded vocabulary back to the tokenizer's, and writes safetensors (sharded above
`max_shard_size`, with model.safetensors.index.json), config.json, generation_config.json and the
tokenizer files (tokenizer.json + tokenizer_config.json for `hf`/`embedded` tokenizers, GPT-2's
vocab.json + merges.txt for `gpt2bpe`), all loadable offline by `AutoModelForCausalLM` /
`AutoTokenizer.from_pretrained(OUT)`.

Import reads a GPTNeoX, Llama or GPT-2 folder (config.json, safetensors or pytorch_model.bin,
sharded or not, and its tokenizer.json or GPT-2's vocab.json + merges.txt), maps it to our canonical names, pads the vocabulary for the target
tensor size, and writes a layout-independent checkpoint plus `config.yml` (model, parallelism,
tokenizer and `checkpoint.init_from`) that `megatron-gpt train` starts from in any layout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from megatron_gpt.checkpoint.reader import read_checkpoint
from megatron_gpt.config.schema import Config, ModelConfig
from megatron_gpt.convert import gpt2, llama, neox
from megatron_gpt.convert.adapter import Adapter, UnsupportedOption
from megatron_gpt.model.names import Prefixes, fit_rows

ADAPTERS: dict[str, Adapter] = {"neox": neox, "llama": llama, "gpt2": gpt2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_IGNORED_HF_KEYS = re.compile(r"(rotary_emb\.inv_freq|attention\.(masked_)?bias|\.attn\.(masked_)?bias)$")
"""Buffers some HF versions save beside the weights; they are recomputed, not imported."""


def _require_hf() -> None:
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        raise UnsupportedOption(f"Hugging Face conversion needs transformers and safetensors ({error}); "
                                "fix: pip install 'megatron-gpt[hf]'") from None


def rope_of(config: Any) -> dict[str, Any]:
    """Rotary settings of an HF config, whichever transformers version wrote or read it:
    theta, the partial rotary factor and the rope type (None or "default" for plain rotary)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or getattr(config, "rotary_emb_base", None))
    partial = params.get("partial_rotary_factor",
                         getattr(config, "partial_rotary_factor", None) or getattr(config, "rotary_pct", None) or 1.0)
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    return {"theta": float(theta if theta is not None else 10000.0), "partial": float(partial), "type": kind}


def infer_arch(cfg: ModelConfig) -> str:
    """gpt2 for LayerNorm + GELU models with learned positions, neox for LayerNorm + GELU ones
    with rotary positions, llama for RMSNorm + SwiGLU ones."""
    if cfg.norm == "layernorm" and cfg.activation in ("gelu", "gelu_tanh") and cfg.position_embedding == "learned":
        return "gpt2"
    if cfg.norm == "layernorm" and cfg.activation == "gelu":
        return "neox"
    if cfg.norm == "rmsnorm" and cfg.activation == "swiglu":
        return "llama"
    raise UnsupportedOption(f"model.norm={cfg.norm} with model.activation={cfg.activation} matches none of "
                            "GPT2LMHeadModel (layernorm + gelu + learned positions), GPTNeoXForCausalLM (layernorm + gelu) "
                            "and LlamaForCausalLM (rmsnorm + swiglu); "
                            "fix: no HF class expresses this model, train with one family's options")


# --------------------------------------------------------------------------- reading our checkpoints


# --------------------------------------------------------------------------- export


def _parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"max shard size {text!r}: expected a size such as 5GB, 500MB or 1000000")
    unit = match.group(2).upper().rstrip("B").rstrip("I")
    return int(float(match.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[unit])


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_size: str | int = "5GB") -> list[str]:
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


def hf_config(adapter: Adapter, cfg: Config, vocab_size: int, tokenizer: Any, dtype: torch.dtype):
    """The transformers config object (built by the installed version's class, so config.json is
    in that version's format); rotary settings are checked after construction."""
    import transformers

    from megatron_gpt.model.layers import ffn_size

    cls = getattr(transformers, getattr(adapter, "CONFIG_CLASS", adapter.ARCHITECTURE.replace("ForCausalLM", "Config")))
    eod = int(tokenizer.eod)
    pad = int(tokenizer.pad) if int(getattr(tokenizer, "pad", -1)) >= 0 else None
    config = cls(**adapter.hf_config_kwargs(cfg.model, vocab_size, ffn_size(cfg.model)),
                 bos_token_id=eod, eos_token_id=eod, pad_token_id=pad)
    config.architectures = [adapter.ARCHITECTURE]
    if int(transformers.__version__.split(".")[0]) >= 5:
        config.dtype = dtype
    else:
        config.torch_dtype = dtype
    if not getattr(adapter, "ROTARY", True):
        return config
    rope = rope_of(config)
    want = {"theta": float(cfg.model.rotary_base), "partial": float(cfg.model.rotary_pct)}
    if abs(rope["theta"] - want["theta"]) > 1e-6 * want["theta"] or abs(rope["partial"] - want["partial"]) > 1e-9 \
            or rope["type"] not in (None, "default"):
        raise UnsupportedOption(f"transformers {transformers.__version__} built {adapter.ARCHITECTURE}'s config with "
                                f"rotary {rope}, not {want}; fix: use a transformers version this exporter knows")
    return config


def write_tokenizer(tokenizer: Any, cfg: Config, out: Path) -> list[str]:
    """Tokenizer files AutoTokenizer loads offline, with the end-of-document token as bos/eos."""
    kind = cfg.tokenizer.type
    before = set(os.listdir(out))
    if kind in ("hf", "embedded"):
        from transformers import PreTrainedTokenizerFast

        eod = tokenizer._tok.id_to_token(tokenizer.eod)  # <|endoftext|>, or Llama 3's <|end_of_text|>, or </s>
        special = {"bos_token": eod, "eos_token": eod}
        if getattr(tokenizer, "pad", -1) >= 0:
            special["pad_token"] = tokenizer._tok.id_to_token(tokenizer.pad)
        hf_tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer.path, model_max_length=cfg.model.seq_length,
                                         clean_up_tokenization_spaces=False, **special)
        hf_tok.save_pretrained(str(out))
    elif kind == "gpt2bpe":
        from transformers import GPT2TokenizerFast

        with tempfile.TemporaryDirectory(prefix="megatron-gpt-gpt2-") as folder:
            shutil.copyfile(tokenizer.vocab_file, Path(folder) / "vocab.json")
            shutil.copyfile(tokenizer.merge_file, Path(folder) / "merges.txt")
            hf_tok = GPT2TokenizerFast.from_pretrained(folder, model_max_length=cfg.model.seq_length)
            hf_tok.save_pretrained(str(out))
    else:
        raise UnsupportedOption(f"tokenizer.type {kind}: writing HF tokenizer files is supported for hf, embedded and "
                                "gpt2bpe tokenizers; fix: pass --no-tokenizer and add the tokenizer files yourself")
    _portable_tokenizer_class(out)
    return sorted(set(os.listdir(out)) - before)


def _portable_tokenizer_class(out: Path) -> None:
    """transformers 5 names the class TokenizersBackend, which 4.x lacks; both load
    PreTrainedTokenizerFast (5.x maps it to the same backend)."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2) + "\n")


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, arch: str | None = None, dtype: str = "fp32",
              tag: str | None = None, max_shard_size: str | int = "5GB", vocab_size: int | None = None,
              tokenizer: bool = True, tokenizer_file: str | os.PathLike | None = None) -> Path:
    """Write an HF folder for `checkpoint`; returns it (tokenizer_file: instead of the checkpoint's
    own tokenizer copy). Raises UnsupportedOption for a model the
    chosen HF class cannot express."""
    _require_hf()
    from transformers import GenerationConfig

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    source = read_checkpoint(checkpoint, tag, tokenizer_file)
    cfg = source.cfg
    arch = arch or infer_arch(cfg.model)
    if arch not in ADAPTERS:
        raise ValueError(f"arch {arch!r}: use one of {', '.join(ADAPTERS)}")
    adapter = ADAPTERS[arch]
    adapter.check(cfg.model)
    rows = vocab_size or source.tokenizer.vocab_size
    padded = source.state[f"{Prefixes.of(cfg.model).embedding}.word.weight"].shape[0]
    if rows > padded:
        raise ValueError(f"vocab size {rows} is larger than the checkpoint's {padded} embedding rows")
    state = {name: (tensor[:rows] if name in Prefixes.of(cfg.model).vocab_names() else tensor)
             for name, tensor in source.state.items()}
    tensors = {name: t.detach().to(DTYPES[dtype]).contiguous().clone() for name, t in adapter.to_hf(state, cfg.model).items()}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = write_safetensors(tensors, out, max_shard_size)
    config = hf_config(adapter, cfg, rows, source.tokenizer, DTYPES[dtype])
    config.save_pretrained(str(out))
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(str(out))
    if tokenizer:
        files += write_tokenizer(source.tokenizer, cfg, out)
    print(f"exported {source.path} (step {source.step}) as {adapter.ARCHITECTURE} ({dtype}, vocab {rows}) to {out}: "
          f"{', '.join(files)}", flush=True)
    return out


# --------------------------------------------------------------------------- import


def read_hf_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder: safetensors or pytorch_model.bin, sharded (with an index) or not."""
    from safetensors.torch import load_file

    for index_name, loader in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "pt")):
        index = folder / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            break
    else:
        files = ["model.safetensors"] if (folder / "model.safetensors").is_file() else (
            ["pytorch_model.bin"] if (folder / "pytorch_model.bin").is_file() else [])
        loader = "st" if files == ["model.safetensors"] else "pt"
    if not files:
        raise FileNotFoundError(f"{folder}: no model.safetensors, pytorch_model.bin or their index.json; fix: pass the "
                                "folder written by save_pretrained")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if loader == "st":
            state.update(load_file(str(folder / name)))
        else:
            state.update(torch.load(folder / name, map_location="cpu", weights_only=True))
    return state


def _model_problems(cfg: Config) -> list[str]:
    """Config problems with the model and its tensor/pipeline sizes (data is the user's to add)."""
    from megatron_gpt.config import ConfigError
    from megatron_gpt.config.loader import validate

    try:
        validate(cfg, world_size=cfg.parallelism.tensor * cfg.parallelism.pipeline)
    except ConfigError as error:
        return [p.text for p in error.problems if p.text.startswith(("model.", "parallelism."))]
    return []


def copy_tokenizer(source: Path, out: Path) -> None:
    """OUT/tokenizer.json from `source`: a tokenizer.json, or a folder holding tokenizer.json or
    GPT-2's vocab.json + merges.txt (converted by transformers); tokenizer_config.json (which
    carries the chat template) is copied beside it when the folder has one."""
    folder = source if source.is_dir() else source.parent
    if source.is_file():
        shutil.copyfile(source, out / "tokenizer.json")
    elif (source / "tokenizer.json").is_file():
        shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    elif (source / "vocab.json").is_file() and (source / "merges.txt").is_file():
        from transformers import GPT2TokenizerFast  # from a folder: vocab_file=/merges_file= build an empty one

        with tempfile.TemporaryDirectory(prefix="megatron-gpt-bpe-") as staging:
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(source / name, Path(staging) / name)
            GPT2TokenizerFast.from_pretrained(staging).backend_tokenizer.save(str(out / "tokenizer.json.tmp"))
        os.replace(out / "tokenizer.json.tmp", out / "tokenizer.json")
    else:
        raise FileNotFoundError(f"{source}: no tokenizer.json, nor vocab.json + merges.txt; fix: pass --tokenizer PATH "
                                "to the tokenizer.json (or the folder) the model was trained with")
    if (folder / "tokenizer_config.json").is_file() and folder.resolve() != out.resolve():
        shutil.copyfile(folder / "tokenizer_config.json", out / "tokenizer_config.json")


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, tensor: int = 1, pipeline: int = 1,
              tokenizer: str | os.PathLike | None = None) -> Path:
    """Write a layout-independent checkpoint of an HF GPTNeoX/Llama/GPT-2 folder plus OUT/config.yml."""
    _require_hf()
    import yaml
    from transformers import AutoConfig

    from megatron_gpt.config import config_to_dict, padded_vocab_size
    from megatron_gpt.config.schema import TokenizerConfig
    from megatron_gpt.checkpoint.saving import write_full
    from megatron_gpt.data.tokenizer import build_tokenizer

    hf_dir, out = Path(hf_dir), Path(out).resolve()
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json; fix: pass a folder written by save_pretrained")
    hf = AutoConfig.from_pretrained(str(hf_dir))
    adapter = next((a for a in ADAPTERS.values() if a.MODEL_TYPE == hf.model_type), None)
    if adapter is None:
        raise UnsupportedOption(f"{hf_dir}: model_type {hf.model_type!r} is not supported; import reads "
                                + " and ".join(f"{a.MODEL_TYPE} ({a.ARCHITECTURE})" for a in ADAPTERS.values()))
    fields = adapter.model_config(hf, rope_of(hf))

    out.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(Path(tokenizer) if tokenizer else hf_dir, out)
    tok_cfg = TokenizerConfig(type="hf", path=str(out / "tokenizer.json"))
    tok = build_tokenizer(tok_cfg)

    cfg = Config.model_validate({
        "name": out.name, "model": fields, "parallelism": {"tensor": tensor, "pipeline": pipeline},
        "tokenizer": tok_cfg.model_dump(), "checkpoint": {"init_from": str(out)},
        "launcher": {"nproc_per_node": tensor * pipeline}})
    problems = _model_problems(cfg)
    if problems:
        raise UnsupportedOption(f"{hf_dir} cannot be laid out as tensor {tensor} x pipeline {pipeline}: " + "; ".join(problems))

    hf_state = read_hf_state(hf_dir)
    if hasattr(adapter, "normalize_keys"):
        hf_state = adapter.normalize_keys(hf_state)
    used = adapter.used_keys(cfg.model)
    if cfg.model.tie_embeddings:  # some tied checkpoints also store the (identical) output matrix
        embedding = next(k for k in used if k.endswith(("embed_in.weight", "embed_tokens.weight", "wte.weight")))
        for name in ("embed_out.weight", "lm_head.weight"):
            if name in hf_state and torch.equal(hf_state[name], hf_state[embedding]):
                del hf_state[name]
    unknown = sorted(k for k in hf_state if k not in used and not _IGNORED_HF_KEYS.search(k))
    missing = sorted(k for k in used if k not in hf_state and not (k == "lm_head.weight" and "embed_out.weight" in hf_state)
                     and not (k == "embed_out.weight" and "lm_head.weight" in hf_state))
    if unknown or missing:
        raise UnsupportedOption(f"{hf_dir}: tensors {unknown[:5]} are not part of a {adapter.ARCHITECTURE} our model can "
                                f"express, or {missing[:5]} are missing; nothing was imported")
    state = {name: t.float() for name, t in adapter.from_hf(hf_state, cfg.model).items()}
    rows = state[f"{Prefixes.of(cfg.model).embedding}.word.weight"].shape[0]
    padded = padded_vocab_size(tok.vocab_size, cfg)
    if not tok.vocab_size <= rows <= padded:
        raise UnsupportedOption(
            f"{hf_dir}: the model has {rows} vocabulary rows, the tokenizer {tok.vocab_size} ids, padded to {padded} "
            f"(model.make_vocab_size_divisible_by {cfg.model.make_vocab_size_divisible_by} x tensor {tensor}); fix: "
            + ("pass the model's own tokenizer" if rows < tok.vocab_size else
               "raise model.make_vocab_size_divisible_by in the written config so the padding holds every row"))
    for name in Prefixes.of(cfg.model).vocab_names():
        state[name] = fit_rows(state[name], padded)

    for stale in [*out.glob("stage*.pt"), out / "universal.json"]:  # an older import's pickled format
        stale.unlink(missing_ok=True)
    write_full(out, state, cfg, tok)
    sections = {key: config_to_dict(cfg)[key] for key in ("name", "model", "parallelism", "tokenizer", "checkpoint")}
    sections["parallelism"] = {"tensor": tensor, "pipeline": pipeline}
    sections["checkpoint"] = {"init_from": str(out)}
    sections["tokenizer"] = {"type": "hf", "path": str(out / "tokenizer.json")}
    header = (f"# {adapter.ARCHITECTURE} imported from {hf_dir.resolve()} by `megatron-gpt import-hf`.\n"
              f"# Add your data and training settings, e.g.:\n"
              f"#   megatron-gpt train {out / 'config.yml'} my-data.yml --set launcher.nproc_per_node={tensor * pipeline}\n"
              "# The weights load from checkpoint.init_from into any layout; the optimizer and LR schedule start at step 0.\n")
    (out / "config.yml").write_text(header + yaml.safe_dump(sections, sort_keys=False))
    print(f"imported {hf_dir} ({adapter.ARCHITECTURE}, {sum(t.numel() for t in state.values()):,} parameters with "
          f"vocab padded {rows} -> {padded}) to {out}; config: {out / 'config.yml'}", flush=True)
    return out
