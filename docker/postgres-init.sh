#!/bin/sh
# Runs once, when the Postgres volume is first initialised (/docker-entrypoint-initdb.d/):
# POSTGRES_DB (prefect) exists already; MLflow gets a database of its own, because both servers
# keep an `alembic_version` table and cannot share one schema.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE DATABASE mlflow;
SQL
