"""Where metrics go besides the console and metrics.jsonl: tensorboard and Weights & Biases.
Both are optional at run time: imported only when enabled, with the install hint if missing."""

from __future__ import annotations

from pathlib import Path

from megatron_gpt.config.schema import Config


def _require(module: str, key: str):
    try:
        return __import__(module)
    except ImportError as error:
        raise RuntimeError(f"logging.{key} needs the `{module}` package; fix: pip install 'megatron-gpt[logging]' "
                           f"or turn logging.{key} off") from error


class Backends:
    """Fans scalar metrics out to the enabled backends (rank 0 only)."""

    def __init__(self, cfg: Config, run_dir: Path, config_dict: dict):
        self.writers = []
        if cfg.logging.tensorboard:
            _require("tensorboard", "tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self.writers.append((lambda step, values: [writer.add_scalar(k, v, step) for k, v in values.items()],
                                 writer.close))
        if cfg.logging.wandb_mode != "disabled":
            wandb = _require("wandb", "wandb_mode")
            run = wandb.init(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity, name=cfg.name,
                             mode=cfg.logging.wandb_mode, dir=str(run_dir), config=config_dict)
            self.writers.append((lambda step, values: run.log(values, step=step), run.finish))

    def log(self, step: int, values: dict[str, float]) -> None:
        for log, _ in self.writers:
            log(step, values)

    def close(self) -> None:
        for _, close in self.writers:
            close()
