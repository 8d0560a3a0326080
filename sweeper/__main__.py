"""`python -m sweeper`: one tracked LoRA fine-tuning trial on the composed config.

With `-m`, Hydra runs our Optuna sweeper (hydra_plugins/pet_lora_sweeper), which calls
this same function once per trial with the sampled overrides and `sweep.*` set.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sweeper import config

config.register()


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    # Heavy imports (torch, metatrain) wait until a trial runs: --help stays fast.
    from sweeper import report, trial

    runtime = HydraConfig.get()
    output_dir = Path(runtime.runtime.output_dir)
    log_file = output_dir / f"{runtime.job.name}.log"
    try:
        if cfg.sweep.study_name is not None:  # a trial of a study: report epochs, may be pruned
            from sweeper.search import job
            from sweeper.search.pruning import configured_pruner

            return job.run(cfg, output_dir, log_file, configured_pruner())
        result = trial.run(cfg, output_dir, log_file=log_file)
    except config.ConfigError as error:  # bad input: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(report.summary(cfg, result))
    return {"state": "complete", "run_id": result.run_id, "metrics": result.metrics}


if __name__ == "__main__":
    main()
