"""Using a trained checkpoint: completing prompts (generate) and lm-eval-harness scoring
(lm_eval_adapter, with the bundled eval_tasks/)."""
