"""`python -m sweeper`: one tracked LoRA fine-tuning trial on the composed config.

With `-m`, Hydra runs our Optuna sweeper (hydra_plugins/pet_lora_sweeper), which calls
this same function once per trial with the sampled overrides and `+sweep.*` appended
(sweeper/search/membership.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sweeper import config, devices, secrets
from sweeper.search import membership
from sweeper.signals import Terminated, exit_code, terminate_as_exception

config.register()


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    # Heavy imports (torch, metatrain) wait until a trial runs: --help stays fast.
    from sweeper import report, trial

    runtime = HydraConfig.get()
    output_dir = Path(runtime.runtime.output_dir)
    log_file = output_dir / f"{runtime.job.name}.log"
    secrets.scrub_hydra_files(output_dir)  # Hydra wrote the command line there already
    if membership.of(cfg) is not None:  # a trial of a study: report epochs, may be pruned, may fail
        from sweeper.search import job
        from sweeper.search.pruning import configured_pruner

        return job.run(cfg, output_dir, log_file, configured_pruner())
    try:
        if cfg.verbose:
            report.log_to_console()
        with terminate_as_exception(), report.epoch_bar(cfg) as each_epoch:
            result = trial.run(cfg, output_dir, on_epoch=each_epoch, log_file=log_file)
    except config.ConfigError as error:  # bad input: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, Terminated) as stop:  # the run ended KILLED on the way out
        print(f"\ntrial stopped ({stop or 'Ctrl-C'}): its MLflow run ended KILLED", file=sys.stderr)
        sys.exit(exit_code(stop))
    except Exception as error:  # its MLflow run ended FAILED on the way out
        said = devices.out_of_memory(error)
        if said is None:
            raise
        print(f"error: {said}", file=sys.stderr)
        sys.exit(1)
    print(report.summary(cfg, result))
    return {"state": "complete", "run_id": result.run_id, "metrics": result.metrics}


if __name__ == "__main__":
    main()
