"""Hydra plugin: our Optuna 5 sweeper with MLflow tracking (`hydra/sweeper=optuna_mlflow`)."""
