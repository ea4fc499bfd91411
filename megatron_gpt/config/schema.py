"""The typed run configuration: one frozen section per concern, one docstring per field.

Field docstrings become the field descriptions (``use_attribute_docstrings``), so
``megatron-gpt config show --doc`` and error messages can quote them.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

from .secrets import MASK, SECRET_NAME, masked_env  # noqa: F401 (MASK, SECRET_NAME: re-exported)


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected, docstrings kept."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class ModelConfig(Section):
    num_layers: int = Field(4, ge=1)
    """Number of transformer blocks."""
    hidden_size: int = Field(128, ge=1)
    """Width of the residual stream."""
    num_attention_heads: int = Field(4, ge=1)
    """Number of query heads."""
    num_kv_heads: Optional[int] = Field(None, ge=1)
    """Key/value heads for grouped-query attention; null means one per query head (MHA)."""
    ffn_hidden_size: Optional[int] = Field(None, ge=1)
    """MLP inner width; null means 4*hidden (gelu) or 8/3*hidden rounded up to 64 (swiglu)."""
    seq_length: int = Field(128, ge=1)
    """Training sequence length in tokens (also the learned-position table size)."""
    make_vocab_size_divisible_by: int = Field(128, ge=1)
    """The embedding table is padded to a multiple of this times the tensor-parallel size."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalization: layernorm (GPT-2/NeoX) or rmsnorm (Llama)."""
    norm_eps: float = Field(1e-5, gt=0)
    """Epsilon of the normalization layers."""
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"
    """MLP activation: gelu (exact, NeoX), gelu_tanh (the tanh approximation GPT-2 was trained with,
    HF's gelu_new) or swiglu (gated, Llama)."""
    position_embedding: Literal["rotary", "learned"] = "rotary"
    """Position encoding: rotary (NeoX/Llama) or a learned table (GPT-2)."""
    rotary_pct: float = Field(1.0, gt=0, le=1)
    """Fraction of each head's dimensions that rotary embeddings rotate (NeoX uses 0.25)."""
    rotary_base: float = Field(10000.0, gt=0)
    """Rotary frequency base (theta)."""
    parallel_residual: bool = False
    """NeoX-style block: x + attn(ln1(x)) + mlp(ln2(x)) instead of the sequential form."""
    bias: bool = True
    """Biases on linear layers and norms (true for GPT-2/NeoX, false for Llama)."""
    tie_embeddings: bool = True
    """Share the input embedding with the output layer."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on attention probabilities and residual branches."""
    init_std: float = Field(0.02, gt=0)
    """Standard deviation of the normal weight initialization."""
    attention_backend: Literal["auto", "sdpa", "flash"] = "auto"
    """auto: flash-attn when installed and on GPU, else torch SDPA; flash: require flash-attn."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute: none stores every activation for the backward pass; selective recomputes
    the attention core (scores, softmax, dropout) as Megatron does (with fused attention kernels,
    which never store the scores, that saves only the softmax statistics); full stores only each
    chunk's input and reruns its blocks in the backward pass (GPT-NeoX: checkpoint_activations).
    Dropout masks are the same in the rerun (RNG state preserved). `megatron-gpt layout` shows the
    activation memory of each mode."""
    recompute_num_layers: int = Field(1, ge=1)
    """recompute=full: transformer blocks per recomputed chunk (Megatron's uniform method, counted
    from each pipeline stage's first block); one stored input per chunk, the chunk's activations
    live only while its backward runs. At most model.num_layers; other recompute modes leave it 1."""


class ParallelismConfig(Section):
    tensor: int = Field(1, ge=1)
    """Tensor-parallel size (megatron-core column/row-parallel layers)."""
    pipeline: int = Field(1, ge=1)
    """Pipeline-parallel size (DeepSpeed PipelineModule)."""
    zero_stage: int = Field(1, ge=0, le=3)
    """DeepSpeed ZeRO stage over the data-parallel group (0 disables ZeRO; 1 and 2 run as 0 with one data-parallel rank and no pipeline)."""
    partition_method: Literal["parameters", "uniform", "layers"] = "parameters"
    """How pipeline stages split the layer list: balanced parameter counts, equal layer counts,
    or equal numbers of transformer blocks."""
    shared_memory_allreduce: bool = True
    """On CPU with every rank on one host: all-reduce fp32 data-parallel gradients (ZeRO-0, tensor=pipeline=1)
    through DeepSpeed's shared-memory kernel instead of gloo's TCP; false keeps gloo."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism (needs tensor > 1 dividing model.seq_length): norms and dropout
    work on this rank's slice of the sequence; all-gather before and reduce-scatter after each
    tensor-parallel region."""


class TokenizerConfig(Section):
    type: Literal["embedded", "hf", "gpt2bpe", "tiktoken", "sentencepiece", "bytes"] = "embedded"
    """embedded: the byte-level BPE bundled with the embedded corpus; hf: a tokenizer.json;
    gpt2bpe: GPT-2 encoder.json + vocab.bpe through tiktoken; tiktoken: an encoding by name;
    sentencepiece: a .model file; bytes: raw UTF-8 bytes. All load offline from local files."""
    path: Optional[str] = None
    """hf: the tokenizer.json; sentencepiece: the .model; tiktoken: the encoding's .tiktoken file
    or a directory holding its files under their original names (optional, see cache_dir)."""
    vocab_file: Optional[str] = None
    """GPT-2 encoder.json (type gpt2bpe)."""
    merge_file: Optional[str] = None
    """GPT-2 vocab.bpe merges (type gpt2bpe)."""
    name: Optional[str] = None
    """tiktoken encoding name (type tiktoken): gpt2, r50k_base, p50k_base, cl100k_base, o200k_base."""
    cache_dir: Optional[str] = None
    """tiktoken cache directory (files named by the sha1 of their URL, as TIKTOKEN_CACHE_DIR);
    null means $TIKTOKEN_CACHE_DIR, else tiktoken's default. Read only: nothing is downloaded."""


class DataConfig(Section):
    embedded: Optional[Literal["shakespeare"]] = None
    """Train on a corpus bundled in the package, preprocessed into the cache on first use."""
    paths: list[str] = []
    """Prefixes of preprocessed datasets (PREFIX.bin / PREFIX.idx), each cut into train/validation/
    test by data.split and blended by data.weights (GPT-NeoX: data_path)."""
    weights: Optional[list[float]] = None
    """Blend weights of data.paths, one positive number per prefix (normalized); null means
    proportional to each dataset's size (GPT-NeoX: data_weights)."""
    train_paths: list[str] = []
    """Per-split lists instead of data.paths: prefixes used whole for training (GPT-NeoX:
    train_data_paths); needs valid_paths; data.split does not apply."""
    train_weights: Optional[list[float]] = None
    """Blend weights of train_paths (null: proportional to size)."""
    valid_paths: list[str] = []
    """Prefixes used whole for validation, with train_paths."""
    valid_weights: Optional[list[float]] = None
    """Blend weights of valid_paths (null: proportional to size)."""
    test_paths: list[str] = []
    """Prefixes used whole for testing, with train_paths (checked, not read during training)."""
    test_weights: Optional[list[float]] = None
    """Blend weights of test_paths (null: proportional to size)."""
    split: str = "969,30,1"
    """Train/validation/test weights over whole documents of each data.paths prefix, e.g. "969,30,1"."""
    cache_dir: Optional[str] = None
    """Where preprocessed embedded corpora and index maps go; null means ~/.cache/megatron_gpt."""
    document_masking: bool = False
    """Packed documents do not attend to each other: each token attends only within its own
    document (split after every end-of-document token) and positions restart at each document,
    in training and validation (SDPA with a block-diagonal causal mask; flash-attn's varlen kernel on GPU)."""


class OptimizerConfig(Section):
    lr: float = Field(6e-4, gt=0)
    """Peak learning rate (AdamW)."""
    min_lr: float = Field(6e-5, ge=0)
    """Learning rate at the end of the decay."""
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay of AdamW."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW beta1."""
    beta2: float = Field(0.95, ge=0, lt=1)
    """AdamW beta2."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""


class ScheduleConfig(Section):
    warmup_steps: int = Field(100, ge=0)
    """Steps of linear warmup from 0 to optimizer.lr."""
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay from lr to min_lr after warmup."""
    decay_steps: Optional[int] = Field(None, ge=1)
    """Step at which the decay reaches min_lr; null means training.train_steps."""


class TrainingConfig(Section):
    train_steps: int = Field(1000, ge=1)
    """Number of optimizer steps."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per micro-batch on each data-parallel rank."""
    global_batch_size: Optional[int] = Field(None, ge=1)
    """Sequences per optimizer step over all ranks; null means micro x grad_accum x dp."""
    gradient_accumulation_steps: Optional[int] = Field(None, ge=1)
    """Micro-batches per step; null means derived from global_batch_size (or 1)."""
    gradient_clipping: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this value (0 disables)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision (bf16/fp16 through DeepSpeed)."""
    seed: int = 1234
    """Seed of model initialization, dropout and data order."""
    eval_interval: int = Field(100, ge=1)
    """Evaluate on the validation split every this many steps (and at the end)."""
    eval_iters: int = Field(10, ge=1)
    """Validation batches per evaluation, each of global_batch_size sequences (as Megatron)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA with nccl when available, else CPU with gloo."""
    generate_samples: int = Field(0, ge=0)
    """Number of samples to generate and print at the end of training."""
    generate_prompt: str = "\n"
    """Prompt the end-of-training samples start from."""
    generate_tokens: int = Field(64, ge=1)
    """Tokens generated per end-of-training sample."""
    auto_resume: bool = True
    """Resume (checkpoint.resume) from the newest complete checkpoint in checkpoint.save_dir, one
    that every rank finished writing (an interrupted save is skipped); false: the one `latest` names."""
    max_skipped_steps: int = Field(10, ge=1)
    """Divergence guard: a step whose loss or gradient norm is not finite is skipped on every rank
    (no update, counted as skipped_steps in the metrics); this many skips in a row stop the run with
    exit code 65 and a message naming the step."""
    spike_factor: Optional[float] = Field(None, gt=1)
    """Also skip a step whose loss exceeds this factor x the median loss of the last 20 applied
    steps (needs 5 of them); null disables the spike guard."""
    compile: bool = False
    """torch.compile each transformer block (inductor, CPU or GPU), applied from outside the model."""


class CheckpointConfig(Section):
    save_dir: Optional[str] = None
    """Directory of checkpoints (global_stepN tag folders and `latest`); null disables saving."""
    save_interval: Optional[int] = Field(None, ge=1)
    """Save every this many steps (a final checkpoint is always written when save_dir is set)."""
    resume: bool = True
    """Resume when save_dir holds a complete checkpoint (which one: training.auto_resume); a
    checkpoint saved under another tensor/pipeline/data layout or ZeRO stage is resharded."""
    keep_last_n: Optional[int] = Field(None, ge=1)
    """Keep only the newest this many complete checkpoints (and delete interrupted saves older
    than the newest); null keeps all."""
    async_save: bool = False
    """Interval saves copy this rank's tensors to host memory and return to training while a
    background thread writes them; `latest` moves once every rank's file is written, the next save
    waits for the previous one, and the final and preemption saves are synchronous. Needs a
    save_dir every rank writes to (rank 0 sees the other ranks' files there)."""
    deepspeed_files: bool = False
    """Also write DeepSpeed's own checkpoint files (pickled) into save_dir/deepspeed/global_stepN,
    for DeepSpeed's tools; megatron-gpt never reads them (it resumes from its own sharded files)."""
    init_from: Optional[str] = None
    """Start from these weights when there is nothing to resume: a layout-independent checkpoint
    (the output of `megatron-gpt import-hf`, a save_dir or a global_step* folder); the optimizer and
    LR schedule start fresh at step 0 (fine-tuning, or pretraining further with a new schedule)."""


class LoggingConfig(Section):
    log_interval: int = Field(10, ge=1)
    """Print one metrics line every this many steps."""
    run_dir: str = "runs/{name}"
    """Directory for the run's resolved config and metrics; {name} is replaced by config.name."""
    tensorboard: bool = False
    """Write tensorboard event files to run_dir/tensorboard (needs the `logging` extra)."""
    wandb_mode: Literal["disabled", "offline", "online"] = "disabled"
    """Weights & Biases: offline writes run files to run_dir/wandb; online needs WANDB_API_KEY in
    the environment (never in a config file)."""
    wandb_project: str = "megatron-gpt"
    """W&B project name."""
    wandb_entity: Optional[str] = None
    """W&B entity (team or user); null means the account's default."""
    peak_tflops: Optional[float] = Field(None, gt=0)
    """Per-device peak TFLOP/s for MFU; null means a known GPU's bf16/fp16 peak (none on CPU)."""
    plot: bool = True
    """Write run_dir/loss.png (loss, validation loss and lr against step) at the end of training."""
    profile_steps: Optional[list[int]] = None
    """[first, last] steps to record with torch.profiler; traces go to run_dir/profile."""




class LauncherConfig(Section):
    type: Literal["local", "pdsh", "openmpi", "mvapich", "slurm", "mpirun"] = "local"
    """How ranks are started: local (torchrun on this host); pdsh, openmpi, mvapich (DeepSpeed's
    runner over launcher.hostfile); slurm (srun inside an allocation, one task per rank); mpirun
    (Open MPI's mpirun, ranks discovered through mpi4py)."""
    nproc_per_node: int = Field(1, ge=1)
    """Processes (ranks) per node."""
    num_nodes: int = Field(1, ge=1)
    """Number of nodes (pdsh: the first num_nodes hosts of the hostfile)."""
    hostfile: Optional[str] = None
    """MPI-style hostfile, one `HOST slots=N` line per node (pdsh, openmpi, mvapich; optional for
    mpirun)."""
    include: Optional[str] = None
    """pdsh: hosts/slots to use, DeepSpeed syntax `host1@host2:0,1` (instead of num_nodes)."""
    exclude: Optional[str] = None
    """pdsh: hosts/slots to leave out, DeepSpeed syntax `host3@host1:2` (instead of num_nodes)."""
    master_addr: Optional[str] = None
    """Address of rank 0; null means the first host used from the hostfile (pdsh, openmpi,
    mvapich), the first node of the SLURM node list (slurm), or rank 0's address (mpirun)."""
    master_port: int = Field(29500, ge=1, le=65535)
    """Rendezvous port of rank 0 (local picks a free port itself)."""
    env: dict[str, str] = {}
    """Environment variables set on every rank, e.g. {NCCL_DEBUG: INFO}. Secrets (names with KEY,
    TOKEN, SECRET, PASS..., names in secret_env, values holding a URL with a password) are masked
    in --dry-run output and saved configs, and reach remote ranks only through a 0600 file."""
    secret_env: list[str] = []
    """More variable names (or PREFIX* patterns) whose values are secrets, e.g. [PGPASSFILE, DB_*]."""
    forward_env: list[str] = ["NCCL_*", "GLOO_*", "WANDB_*", "PYTHONPATH", "HF_*", "MEGATRON_GPT_*"]
    """Variables copied from the launching shell to every rank: names, or prefixes ending in *."""
    launcher_args: str = ""
    """Extra arguments for the underlying launcher (pdsh, mpirun or srun), e.g. "--bind-to none"."""
    threads_per_rank: Optional[int] = Field(None, ge=1)
    """torch/OMP threads per rank; null means the node's cores divided by its ranks."""

    @field_validator("env", mode="before")
    @classmethod
    def _env_values_as_text(cls, value: Any) -> Any:
        """YAML scalars (numbers, booleans) become the text a shell would see."""
        if not isinstance(value, dict):
            return value
        return {k: (str(v).lower() if isinstance(v, bool) else str(v) if isinstance(v, (int, float)) else v)
                for k, v in value.items()}

    @field_validator("env")
    @classmethod
    def _drop_masked_values(cls, value: dict[str, str]) -> dict[str, str]:
        """A saved config (run_dir/config.yaml, a checkpoint's) holds MASK in place of each secret:
        reusing it must not set WANDB_API_KEY=*** on the ranks. Such a variable is left unset here,
        so the rank keeps what the launching shell forwards (launcher.forward_env)."""
        return {k: v for k, v in value.items() if v != MASK}

    @field_serializer("env")
    def _mask_secrets(self, env: dict[str, str]) -> dict[str, str]:
        return masked_env(env, self.secret_env)


class Config(Section):
    name: str = "run"
    """Run name, used in the run directory."""
    model: ModelConfig = ModelConfig()
    """The network's shape and family options."""
    parallelism: ParallelismConfig = ParallelismConfig()
    """Tensor/pipeline sizes and ZeRO stage; data parallel is the rest of the world size."""
    tokenizer: TokenizerConfig = TokenizerConfig()
    """Which tokenizer encodes the corpus."""
    data: DataConfig = DataConfig()
    """Training corpora and the train/validation/test split."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """AdamW hyper-parameters."""
    schedule: ScheduleConfig = ScheduleConfig()
    """Learning-rate warmup and decay."""
    training: TrainingConfig = TrainingConfig()
    """Steps, batch sizes, precision, evaluation."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Saving and resuming."""
    logging: LoggingConfig = LoggingConfig()
    """Metrics output."""
    launcher: LauncherConfig = LauncherConfig()
    """How and where ranks are started."""
    deepspeed: dict[str, Any] = {}
    """Merged last into the DeepSpeed JSON derived from the sections above, for what they do not
    model (offload_optimizer/offload_param under zero_optimization, overlap_comm, bucket sizes,
    flops_profiler, comms_logger, ...); keys derived from other sections are refused here."""

    @property
    def world_size(self) -> int:
        """Total ranks the launcher starts."""
        return self.launcher.nproc_per_node * self.launcher.num_nodes
