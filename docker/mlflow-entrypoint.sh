#!/bin/sh
# Writes MLflow's basic-auth config from the environment (.env), then serves.
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?}" "${MLFLOW_AUTH_DATABASE_URI:?}" "${MLFLOW_ADMIN_USERNAME:?}"
: "${MLFLOW_ADMIN_PASSWORD:?at least 12 characters}" "${MLFLOW_FLASK_SERVER_SECRET_KEY:?}"
export MLFLOW_AUTH_CONFIG_PATH="$HOME/basic_auth.ini"
umask 077
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_ADMIN_USERNAME}
admin_password = ${MLFLOW_ADMIN_PASSWORD}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
exec mlflow server --app-name basic-auth --host 0.0.0.0 --port 5000 \
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" --artifacts-destination /artifacts
