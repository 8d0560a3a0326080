"""The recipe of the embedded base model: `python -m sweeper.pretrain`.

Trains a small PET from scratch on the embedded bulk-copper set and writes the
checkpoint plus a model card (recipe, data sha256, errors on its own training set)
into `sweeper/assets/`. The shipped checkpoint was made by this command; rerun it to
rebuild the base model, e.g. after a metatrain upgrade changes the checkpoint format.
`--size metatrain` makes a larger PET (metatrain's default sizes, about 4x the
parameters) on the same data, for benchmarks.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sweeper import embedded
from sweeper import metatrain as mtt
from sweeper.evaluate import errors
from sweeper.files import file_sha256

MODEL_HYPERS = {
    "cutoff": 4.5,
    "d_pet": 64,
    "d_head": 64,
    "d_node": 128,
    "d_feedforward": 128,
    "num_heads": 4,
    "num_attention_layers": 1,
    "num_gnn_layers": 2,
}
SIZES = {"embedded": MODEL_HYPERS, "metatrain": {"cutoff": 4.5}}  # the rest: metatrain's defaults
TRAINING_HYPERS = {
    "batch_size": 8,
    "num_epochs": 60,
    "learning_rate": 3e-3,
    "warmup_fraction": 0.05,
    "num_workers": 0,
    "log_interval": 5,
    "checkpoint_interval": 100000,
}
VALIDATION_STRUCTURES = 16


def pretrain(output: Path, epochs: int, threads: int, model_hypers: dict = MODEL_HYPERS) -> dict:
    torch.set_num_threads(threads)
    mtt.seed_everything(embedded.SEED)
    paths = embedded.ensure_datasets()
    labels = mtt.Labels()
    dataset, target_info = mtt.read_dataset(paths["original"], labels)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(embedded.SEED))
    val_set = torch.utils.data.Subset(dataset, order[:VALIDATION_STRUCTURES].tolist())
    train_set = torch.utils.data.Subset(dataset, order[VALIDATION_STRUCTURES:].tolist())

    info = mtt.dataset_info(mtt.atomic_types([dataset]), target_info, labels.length_unit)
    model = mtt.new_model(model_hypers, info)
    hypers = mtt.training_hypers({**TRAINING_HYPERS, "num_epochs": epochs}, None, [labels])

    def report(epoch: int, row: dict[str, float]) -> None:
        print(f"epoch {epoch:4d}  " + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if "val" in k))

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        result = mtt.train(model, hypers, [train_set], [val_set], torch.device("cpu"), Path(workdir), report)
    seconds = time.perf_counter() - start
    output.parent.mkdir(parents=True, exist_ok=True)
    mtt.save_checkpoint(result, model, output)

    base = mtt.load_checkpoint(output)
    card = {
        "recipe": "python -m sweeper.pretrain",
        "recipe_version": embedded.RECIPE_VERSION,
        "model_hypers": model_hypers,
        "training_hypers": hypers | {"finetune": None},
        "epochs": epochs,
        "best_epoch": result.best_epoch,
        "training_seconds": round(seconds, 1),
        "threads": threads,
        "metatrain_version": mtt.METATRAIN_VERSION,
        "torch_version": torch.__version__,
        "parameters": mtt.parameter_count(base)[0],
        "training_data": {"file": paths["original"].name, "sha256": file_sha256(paths["original"])},
        "errors_on_training_set": errors(base, dataset, labels, torch.device("cpu")),
        "checkpoint_sha256": file_sha256(output),
    }
    output.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-o", "--output", type=Path, default=embedded.base_model_path())
    parser.add_argument("--epochs", type=int, default=TRAINING_HYPERS["num_epochs"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", choices=SIZES, default="embedded")
    args = parser.parse_args()
    card = pretrain(args.output, args.epochs, args.threads, SIZES[args.size])
    print(json.dumps(card["errors_on_training_set"], indent=2))
    print(f"wrote {args.output} ({card['parameters']} parameters, {card['training_seconds']} s)")


if __name__ == "__main__":
    main()
