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
CONF = Path(__file__).resolve().parent.parent / "conf"  # the repo's conf/ (editable install)


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    import optuna  # heavy imports (torch, metatrain) wait until a trial runs: --help stays fast

    from sweeper import objective, report, trial

    runtime = HydraConfig.get()
    output_dir = Path(runtime.runtime.output_dir)
    hooks: dict[str, Any] = {}
    if cfg.sweep.study_name is not None:
        from sweeper.search.pruning import Reporter, configured_pruner

        reporter = Reporter(cfg, configured_pruner())
        hooks = {"on_epoch": reporter, "on_start": reporter.started}
    try:
        result = trial.run(cfg, output_dir, log_file=output_dir / f"{runtime.job.name}.log", **hooks)
    except config.ConfigError as error:  # bad input: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except optuna.TrialPruned as pruned:
        print(f"trial pruned: {pruned}")
        return {"state": "pruned"}
    print(report.summary(cfg, result))
    return objective.outcome(cfg, result.metrics, result.run_id)


if __name__ == "__main__":
    main()
