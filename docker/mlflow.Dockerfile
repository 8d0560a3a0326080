# The MLflow tracking server: PostgreSQL backend store, artifacts on a volume, basic auth.
# No credential is baked in: the entrypoint writes the auth config from the environment.
FROM python:3.11-slim

# Both PostgreSQL drivers: postgresql:// (psycopg 3 with SQLAlchemy 2.1), postgresql+psycopg2://.
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" "psycopg[binary]>=3.1" "psycopg2-binary>=2.9" \
    && useradd --create-home --uid 1000 mlflow \
    && mkdir /artifacts && chown mlflow:mlflow /artifacts
# A fresh named volume mounted on /artifacts copies this folder's owner: the server can write.
COPY docker/mlflow-entrypoint.sh /usr/local/bin/mlflow-entrypoint.sh
USER mlflow
EXPOSE 5000
ENTRYPOINT ["/usr/local/bin/mlflow-entrypoint.sh"]
