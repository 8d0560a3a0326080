-- The Optuna storage is POSTGRES_DB (optuna); MLflow gets its own store and auth databases.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
