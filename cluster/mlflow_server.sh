#!/usr/bin/env bash
# MLflow tracking server for an eimf cluster: runs/params/metrics in a database, artifacts (models, item
# embeddings, plots) on S3, served through the tracking server itself (clients need no S3 credentials:
# they upload over HTTP to mlflow-artifacts:/, the server writes to --artifacts-destination).
#
#   cluster/mlflow_server.sh                 # foreground (exec): Ctrl-C stops it
#   cluster/mlflow_server.sh --background    # head node: (re)start it detached, wait until /health answers
#   cluster/mlflow_server.sh --stop
#
# Settings (environment):
#   EIMF_MLFLOW_BACKEND    backend store; default sqlite:///$EIMF_MLFLOW_DIR/mlflow.db. Postgres:
#                          postgresql://user:pass@host:5432/mlflow (then `pip install psycopg2-binary`).
#   EIMF_MLFLOW_ARTIFACTS  where artifacts go; default s3://$EIMF_S3_BUCKET/mlflow-artifacts. Required when
#                          EIMF_S3_BUCKET is unset (any URI MLflow knows: s3://..., /abs/path).
#   EIMF_MLFLOW_HOST       interface to bind; default 0.0.0.0 (workers log metrics to the head). MLflow's own
#                          Host-header check admits localhost and private IPs (10.*, 172.16-31.*, 192.168.*).
#   EIMF_MLFLOW_PORT       default 5000
#   EIMF_MLFLOW_WORKERS    server worker processes; default 1 with SQLite (one writer), else 4
#   EIMF_MLFLOW_DIR        SQLite file, pid file and log; default ~/mlflow
#   MLFLOW_S3_ENDPOINT_URL an S3-compatible endpoint (MinIO, moto) for the artifact store; unset on AWS.
# S3 credentials come from boto3's usual chain (the head's instance role on AWS, or AWS_* variables).
set -euo pipefail

DIR=${EIMF_MLFLOW_DIR:-$HOME/mlflow}
HOST=${EIMF_MLFLOW_HOST:-0.0.0.0}
PORT=${EIMF_MLFLOW_PORT:-5000}
BACKEND=${EIMF_MLFLOW_BACKEND:-sqlite:///$DIR/mlflow.db}
PIDFILE=$DIR/mlflow-server.pid
LOG=$DIR/mlflow-server.log
if [ -n "${EIMF_MLFLOW_ARTIFACTS:-}" ]; then
  ARTIFACTS=$EIMF_MLFLOW_ARTIFACTS
elif [ -n "${EIMF_S3_BUCKET:-}" ]; then
  ARTIFACTS=s3://$EIMF_S3_BUCKET/mlflow-artifacts
else
  echo "mlflow_server.sh: set EIMF_S3_BUCKET (artifacts go to s3://\$EIMF_S3_BUCKET/mlflow-artifacts) or EIMF_MLFLOW_ARTIFACTS (cluster/cluster.env on a cluster)" >&2
  exit 2
fi
case "$BACKEND" in sqlite:*) DEFAULT_WORKERS=1 ;; *) DEFAULT_WORKERS=4 ;; esac
WORKERS=${EIMF_MLFLOW_WORKERS:-$DEFAULT_WORKERS}
# The venv's mlflow when this runs from the repo (ray_cluster.yaml), else the one on PATH.
MLFLOW=$(dirname "$0")/../.venv/bin/mlflow
[ -x "$MLFLOW" ] || MLFLOW=$(command -v mlflow) || { echo "mlflow_server.sh: mlflow is not installed" >&2; exit 2; }
mkdir -p "$DIR"

stop() {
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    # The pid is the process group leader (setsid): stop the server and its workers together.
    kill -- "-$(cat "$PIDFILE")" 2>/dev/null || kill "$(cat "$PIDFILE")"
    for _ in $(seq 50); do kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -f "$PIDFILE"
}

ARGS=(server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" --serve-artifacts
      --host "$HOST" --port "$PORT" --workers "$WORKERS")

case "${1:-}" in
  --stop) stop ;;
  --background)
    stop
    setsid "$MLFLOW" "${ARGS[@]}" >"$LOG" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    PROBE=$HOST; [ "$PROBE" = 0.0.0.0 ] && PROBE=127.0.0.1
    for _ in $(seq 120); do
      if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://$PROBE:$PORT/health', timeout=2)" 2>/dev/null; then
        echo "MLflow server on $HOST:$PORT (pid $(cat "$PIDFILE")), backend $BACKEND, artifacts $ARTIFACTS, log $LOG"
        exit 0
      fi
      kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { echo "mlflow_server.sh: the server exited; last lines of $LOG:" >&2; tail -20 "$LOG" >&2; exit 1; }
      sleep 1
    done
    echo "mlflow_server.sh: no answer on http://$PROBE:$PORT/health after 120 s; see $LOG" >&2
    exit 1 ;;
  "") exec "$MLFLOW" "${ARGS[@]}" ;;
  *) echo "usage: $0 [--background|--stop]" >&2; exit 2 ;;
esac
