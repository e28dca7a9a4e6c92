#!/usr/bin/env bash
# Create the derm-t2im work pools and the `gpu` tag concurrency limit on a Prefect server, then
# register every deployment in deployments/prefect.yaml. Safe to re-run: pools are updated in
# place (--overwrite) and the concurrency limit is an upsert.
#
#   export PREFECT_API_URL=http://127.0.0.1:4200/api
#   deployments/setup.sh [--cuda-type docker|kubernetes|process] [--gpu-slots N] [--no-deploy]
#
#   --cuda-type   how the `cuda` pool runs flows (default: docker)
#                   docker      one container per flow run from docker/Dockerfile.cuda, with an
#                               NVIDIA device request (deployments/work-pools/cuda-docker.json)
#                   kubernetes  one Job per flow run requesting nvidia.com/gpu
#                               (deployments/work-pools/cuda-kubernetes.json)
#                   process     flows run as subprocesses of a worker that already sits on a GPU
#                               (docker/compose.yaml's gpu worker, or a bare GPU host)
#                 A pool keeps the type it was created with: setup.sh stops when the
#                 existing `cuda` pool has another type (`prefect work-pool delete cuda` first).
#   --gpu-slots   tasks tagged `gpu` that may run at once across all workers (default: 1; set it
#                 to the number of GPUs serving the cuda pool)
#   --no-deploy   create pools and the limit only
#
# Environment: PREFECT (the prefect command, e.g. "python -m prefect"; default: `prefect` on
# PATH, else the project's .venv/bin/prefect), PREFECT_API_URL (required: without it every CLI
# call would talk to its own throw-away temporary server), CUDA_POOL_TYPE and GPU_SLOTS (same as
# the flags).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
POOLS="$ROOT/deployments/work-pools"
CUDA_POOL_TYPE="${CUDA_POOL_TYPE:-docker}"
GPU_SLOTS="${GPU_SLOTS:-1}"
DEPLOY=1

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --cuda-type) CUDA_POOL_TYPE="${2:?--cuda-type needs a value}"; shift 2 ;;
    --cuda-type=*) CUDA_POOL_TYPE="${1#*=}"; shift ;;
    --gpu-slots) GPU_SLOTS="${2:?--gpu-slots needs a value}"; shift 2 ;;
    --gpu-slots=*) GPU_SLOTS="${1#*=}"; shift ;;
    --no-deploy) DEPLOY=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

if [[ -z "${PREFECT:-}" ]]; then
  if command -v prefect >/dev/null 2>&1; then PREFECT=prefect
  elif [[ -x "$ROOT/.venv/bin/prefect" ]]; then PREFECT="$ROOT/.venv/bin/prefect"
  else echo "setup.sh: no prefect executable found (set PREFECT=/path/to/prefect)" >&2; exit 1
  fi
fi
if [[ -z "${PREFECT_API_URL:-}" ]]; then
  echo "setup.sh: set PREFECT_API_URL to your Prefect server, e.g. http://127.0.0.1:4200/api" >&2
  echo "          (start one with: prefect server start --host 127.0.0.1)" >&2
  exit 1
fi
if ! [[ "$GPU_SLOTS" =~ ^[1-9][0-9]*$ ]]; then
  echo "setup.sh: --gpu-slots must be a positive integer, got '$GPU_SLOTS'" >&2; exit 2
fi

cd "$ROOT"  # prefect.yaml's entrypoints are relative to the repository root
# PREFECT may be a command with arguments (e.g. "python -m prefect"): split it on purpose.
# shellcheck disable=SC2086
pf() { $PREFECT --no-prompt "$@"; }

# A pool keeps the type it was created with, and `work-pool create --overwrite` would silently
# give an existing pool of another type that type's default template (no GPU request): refuse.
PY="$(command -v python3 || command -v python || true)"
if [[ -n "$PY" ]] && inspected="$(pf work-pool inspect cuda --output json 2>/dev/null)"; then
  have="$(printf '%s' "$inspected" | "$PY" -c 'import json, sys; print(json.load(sys.stdin).get("type", ""))' 2>/dev/null || true)"
  if [[ -n "$have" && "$have" != "$CUDA_POOL_TYPE" ]]; then
    echo "setup.sh: work pool 'cuda' exists with type '$have', not '$CUDA_POOL_TYPE'." >&2
    echo "          Keep it (--cuda-type $have) or remove it first: prefect work-pool delete cuda" >&2
    exit 1
  fi
fi

echo "==> work pool 'cpu' (process) on $PREFECT_API_URL"
pf work-pool create cpu --type process --overwrite

case "$CUDA_POOL_TYPE" in
  docker|kubernetes)
    echo "==> work pool 'cuda' ($CUDA_POOL_TYPE, template $POOLS/cuda-$CUDA_POOL_TYPE.json)"
    pf work-pool create cuda --type "$CUDA_POOL_TYPE" \
      --base-job-template "$POOLS/cuda-$CUDA_POOL_TYPE.json" --overwrite ;;
  process)
    echo "==> work pool 'cuda' (process: run its worker on a GPU host)"
    pf work-pool create cuda --type process --overwrite ;;
  *) echo "setup.sh: --cuda-type must be docker, kubernetes or process, got '$CUDA_POOL_TYPE'" >&2; exit 2 ;;
esac

echo "==> concurrency limit: at most $GPU_SLOTS task run(s) tagged 'gpu' at once"
pf concurrency-limit create gpu "$GPU_SLOTS"

if [[ "$DEPLOY" == 1 ]]; then
  echo "==> deployments from deployments/prefect.yaml"
  pf deploy --all --prefect-file deployments/prefect.yaml
fi
echo "==> done. Start workers: see deployments/README.md"
