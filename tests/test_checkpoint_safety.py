"""Checkpoints from someone else: nothing pickled is ever loaded, and a checkpoint carries its tokenizer.

- A run trained with an `hf` tokenizer (and checkpoint.deepspeed_files, which writes DeepSpeed's
  own files beside, in save_dir/deepspeed), its save_dir copied elsewhere and the original
  tokenizer.json deleted: generate and export-hf work from the copy inside the tag (`--tokenizer`
  overrides it), and no file of the checkpoint is a pickle or a torch.save archive.
- Folders carrying pickle payloads (DeepSpeed's *_model_states.pt / *_optim_states.pt names, a
  .bin, a pickled metadata.json): resume, generate, eval and export-hf stop with one clear error
  and the payload never runs.
- An interrupted save named by `latest` is reported as such by the readers, naming the folder and
  the last complete tag.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yml"
TOKENIZER_ASSET = REPO / "megatron_gpt" / "data" / "assets" / "shakespeare-bpe.json"


class Payload:
    def __init__(self, mark: Path):
        self.mark = str(mark)

    def __reduce__(self):
        return (os.system, (f"touch {self.mark}",))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "megatron_gpt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache) -> tuple[Path, Path]:
    """(save_dir copied elsewhere with the original tokenizer deleted, the tmp folder)."""
    tmp = tmp_path_factory.mktemp("portable")
    tokenizer = tmp / "tok" / "tokenizer.json"
    tokenizer.parent.mkdir()
    shutil.copyfile(TOKENIZER_ASSET, tokenizer)
    sets = ["tokenizer.type=hf", f"tokenizer.path={tokenizer}", f"data.cache_dir={data_cache}",
            f"logging.run_dir={tmp / 'run'}", "logging.plot=false", "training.train_steps=2", "training.eval_iters=1",
            f"checkpoint.save_dir={tmp / 'ckpt'}", "training.generate_samples=0", "checkpoint.deepspeed_files=true"]
    done = cli("train", str(TINY), *[a for s in sets for a in ("--set", s)], cwd=tmp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # checkpoint.deepspeed_files: DeepSpeed's own (pickled) files, outside the tag folder.
    assert list((tmp / "ckpt" / "deepspeed" / "global_step2").glob("*model_states.pt"))
    shutil.rmtree(tmp / "ckpt" / "deepspeed")
    moved = tmp / "elsewhere" / "ckpt"
    shutil.copytree(tmp / "ckpt", moved)
    shutil.rmtree(tmp / "ckpt")
    tokenizer.unlink()
    return moved, tmp


def test_portable_checkpoint_with_its_own_tokenizer(trained):
    save_dir, tmp = trained
    files = [p for p in save_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:  # no pickle (protocol 2+ starts with 0x80) and no torch.save zip archive
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and not zipfile.is_zipfile(path), path
    metadata = json.loads((save_dir / "global_step2" / "metadata.json").read_text())
    assert metadata["tokenizer"]["files"] == ["tokenizer/tokenizer.json"]

    done = cli("generate", str(save_dir), "--prompt", "To be", "--max-new-tokens", "5", "--temperature", "0", cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("To be") and len(done.stdout.strip()) > len("To be")
    done = cli("export-hf", str(save_dir), str(tmp / "hf"), cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp / "hf" / "model.safetensors").is_file() and (tmp / "hf" / "tokenizer.json").is_file()
    # --tokenizer overrides the saved copy (a missing file: one clear error naming it).
    done = cli("generate", str(save_dir), "--prompt", "To be", "--max-new-tokens", "2", "--tokenizer",
               str(TOKENIZER_ASSET), cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    done = cli("generate", str(save_dir), "--prompt", "To be", "--tokenizer", str(tmp / "nowhere.json"), cwd=tmp)
    assert done.returncode == 2 and "nowhere.json" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("crafted", ["global_step2/mp_rank_00_model_states.pt",
                                     "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                     "global_step2/pytorch_model.bin", "global_step2/metadata.json"])
def test_pickle_payloads_never_run(trained, crafted):
    save_dir, tmp = trained
    name = crafted.replace("/", "-")
    copy = tmp / f"crafted-{name}"
    shutil.copytree(save_dir, copy)
    mark = tmp / f"payload-ran-{name}"
    (copy / crafted).write_bytes(pickle.dumps(Payload(mark)))
    tag = copy / "global_step2"
    runs = {
        "generate": cli("generate", str(copy), "--prompt", "To be", cwd=tmp),
        "export-hf": cli("export-hf", str(copy), str(tmp / f"hf-{name}"), cwd=tmp),
        "eval": cli("eval", str(copy), "--tasks", "shakespeare_ppl", "--limit", "1", cwd=tmp),
        "resume": cli("train", str(TINY), "--set", f"checkpoint.save_dir={copy}", "--set", "training.train_steps=3",
                      "--set", "tokenizer.type=hf", "--set", f"tokenizer.path={TOKENIZER_ASSET}",
                      "--set", f"logging.run_dir={tmp / ('resume-' + name)}", "--set", "logging.plot=false", cwd=tmp),
    }
    for command, done in runs.items():
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:") or "CheckpointError" in line]
        assert done.returncode != 0, (command, done.stdout[-2000:])
        assert errors and str(tag) in errors[0] and "fix:" in errors[0], (command, done.stderr[-3000:])
        assert "pickle" in errors[0] or "JSON" in errors[0], (command, errors[0])
    assert not mark.exists(), "a pickle payload ran"


def test_interrupted_save_is_reported_by_readers(trained):
    save_dir, tmp = trained
    copy = tmp / "interrupted"
    shutil.copytree(save_dir, copy)
    torn = copy / "global_step3"
    shutil.copytree(copy / "global_step2", torn)
    (torn / "metadata.json").unlink()
    (copy / "latest").write_text("global_step3")
    for args in (["generate", str(copy), "--prompt", "x"], ["export-hf", str(copy), str(tmp / "hf-torn")]):
        done = cli(*args, cwd=tmp)
        assert done.returncode == 2, done.stderr[-2000:]
        line = done.stderr.strip().splitlines()[-1]
        assert "interrupted save" in line and str(torn) in line and "global_step2" in line, line
