#!/usr/bin/env bash
# MLflow tracking server for an eimf cluster: runs/params/metrics in a database, artifacts (models, item
# embeddings, plots) on S3, served through the tracking server itself (clients need no S3 credentials:
# they upload over HTTP to mlflow-artifacts:/, the server writes to --artifacts-destination).
#
# It always runs MLflow's basic-auth app: a request without credentials gets 401. On its first start the
# script generates two passwords (and the app's CSRF signing key, flask_secret) into $EIMF_MLFLOW_DIR, every file
# mode 600 and so readable only on this host:
#   basic_auth.ini   the admin account (user `admin`), for people: the UI, the REST API, permissions;
#   job.env          MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of the account `eimf-jobs` that jobs log
#                    with. Source it into the environment of `ray start` on every node (ray_cluster.yaml syncs it
#                    to the workers): every Ray process then has it, and no job argument or runtime env carries it.
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
#   EIMF_MLFLOW_HOST       interface to bind; default 0.0.0.0 (workers log metrics to the head; keep the port
#                          closed to the outside: on AWS the security group opens SSH only). MLflow's own
#                          Host-header check admits localhost and private IPs (10.*, 172.16-31.*, 192.168.*).
#   EIMF_MLFLOW_PORT       default 5000
#   EIMF_MLFLOW_WORKERS    server worker processes; default 1 with SQLite (one writer), else 4
#   EIMF_MLFLOW_DIR        SQLite files, credentials, pid file and log; default ~/mlflow
#   MLFLOW_S3_ENDPOINT_URL an S3-compatible endpoint (MinIO, moto) for the artifact store; unset on AWS.
# S3 credentials come from boto3's usual chain (the head's instance role on AWS, or AWS_* variables).
set -euo pipefail

DIR=${EIMF_MLFLOW_DIR:-$HOME/mlflow}
HOST=${EIMF_MLFLOW_HOST:-0.0.0.0}
PORT=${EIMF_MLFLOW_PORT:-5000}
BACKEND=${EIMF_MLFLOW_BACKEND:-sqlite:///$DIR/mlflow.db}
PIDFILE=$DIR/mlflow-server.pid
LOG=$DIR/mlflow-server.log
AUTH_INI=$DIR/basic_auth.ini
JOB_ENV=$DIR/job.env
JOB_USER=eimf-jobs
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
PYTHON=$(dirname "$MLFLOW")/python
[ -x "$PYTHON" ] || PYTHON=python3
PROBE=$HOST; [ "$PROBE" = 0.0.0.0 ] && PROBE=127.0.0.1
# Everything the server writes here (passwords, the user store, the run store) is for this host's root only.
umask 077
mkdir -p "$DIR"
chmod 700 "$DIR"

secret() { "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(24))'; }

# The auth app's settings with a generated admin password, written once: MLflow creates the admin account from
# it on the first start against an empty user store and ignores it afterwards.
write_auth_config() {
  [ -f "$AUTH_INI" ] && return 0
  local password; password=$(secret)
  (printf '%s\n' "[mlflow]" "default_permission = READ" "database_uri = sqlite:///$DIR/basic_auth.db" \
    "admin_username = admin" "admin_password = $password" \
    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth" > "$AUTH_INI")
}

# The jobs' account, created once through the REST API as admin; its credentials go to job.env (mode 600).
ensure_job_account() {
  [ -f "$JOB_ENV" ] && return 0
  local password; password=$(secret)
  AUTH_INI=$AUTH_INI URL="http://$PROBE:$PORT" JOB_USER=$JOB_USER JOB_PASSWORD=$password "$PYTHON" -c '
import configparser, os, sys
import requests
c = configparser.ConfigParser()
c.read(os.environ["AUTH_INI"])
admin = (c["mlflow"]["admin_username"], c["mlflow"]["admin_password"])
r = requests.post(os.environ["URL"] + "/api/2.0/mlflow/users/create", auth=admin, timeout=30,
                  json={"username": os.environ["JOB_USER"], "password": os.environ["JOB_PASSWORD"]})
if not r.ok:
    sys.exit("mlflow_server.sh: creating the jobs account failed: %s %s" % (r.status_code, r.text[:300]))
'
  (printf 'MLFLOW_TRACKING_USERNAME=%s\nMLFLOW_TRACKING_PASSWORD=%s\n' "$JOB_USER" "$password" > "$JOB_ENV")
}

stop() {
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    # The pid is the process group leader (setsid): stop the server and its workers together.
    kill -- "-$(cat "$PIDFILE")" 2>/dev/null || kill "$(cat "$PIDFILE")"
    for _ in $(seq 50); do kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -f "$PIDFILE"
}

ARGS=(server --app-name basic-auth --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS"
      --serve-artifacts --host "$HOST" --port "$PORT" --workers "$WORKERS")

case "${1:-}" in
  --stop) stop; exit 0 ;;
  --background|"") ;;
  *) echo "usage: $0 [--background|--stop]" >&2; exit 2 ;;
esac
write_auth_config
export MLFLOW_AUTH_CONFIG_PATH=$AUTH_INI
# The auth app signs its CSRF tokens with this key: generated once, kept beside the passwords, stable across restarts.
[ -f "$DIR/flask_secret" ] || secret > "$DIR/flask_secret"
MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$DIR/flask_secret")
export MLFLOW_FLASK_SERVER_SECRET_KEY
if [ -z "${1:-}" ]; then
  [ -f "$JOB_ENV" ] || echo "mlflow_server.sh: the jobs' account is created by --background; in the foreground, create it as admin ($AUTH_INI)" >&2
  exec "$MLFLOW" "${ARGS[@]}"
fi
stop
setsid "$MLFLOW" "${ARGS[@]}" >"$LOG" 2>&1 < /dev/null &
echo $! > "$PIDFILE"
for _ in $(seq 120); do
  if "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://$PROBE:$PORT/health', timeout=2)" 2>/dev/null; then
    ensure_job_account
    echo "MLflow server on $HOST:$PORT (pid $(cat "$PIDFILE")), basic auth (admin: $AUTH_INI, jobs: $JOB_ENV), backend $BACKEND, artifacts $ARTIFACTS, log $LOG"
    exit 0
  fi
  kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { echo "mlflow_server.sh: the server exited; last lines of $LOG:" >&2; tail -20 "$LOG" >&2; exit 1; }
  sleep 1
done
echo "mlflow_server.sh: no answer on http://$PROBE:$PORT/health after 120 s; see $LOG" >&2
exit 1
