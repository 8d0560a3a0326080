"""`python -m sweeper`: one tracked LoRA fine-tuning trial on the composed config."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sweeper import config

config.register()
CONF = Path(__file__).resolve().parent.parent / "conf"  # the repo's conf/ (editable install)


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def main(cfg: DictConfig) -> dict:
    from sweeper import objective, report, trial  # heavy (torch, metatrain): not for --help

    runtime = HydraConfig.get()
    output_dir = Path(runtime.runtime.output_dir)
    try:
        result = trial.run(cfg, output_dir, log_file=output_dir / f"{runtime.job.name}.log")
    except config.ConfigError as error:  # bad input: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(report.summary(cfg, result))
    return objective.outcome(cfg, result.metrics, result.run_id)


if __name__ == "__main__":
    main()
