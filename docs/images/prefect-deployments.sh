#!/usr/bin/env bash
# Reproduces docs/images/prefect-deployments.png: a throwaway Prefect server (SQLite), a workspace with the
# `digits` learner, `strata deploy`, a `strata worker` (so the deployments show Ready), then headless Chromium (Debian's `chromium` package) on the UI's
# deployments page. Run from anywhere after `make install`; needs `apt-get install chromium`.
set -euo pipefail
set -m  # job control: each background job gets its own process group, stopped whole on exit
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${VENV:-$root/.venv}
port=${PORT:-4217}
tmp=$(mktemp -d)
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 PREFECT_HOME=$tmp/prefect
export PREFECT_API_URL=http://127.0.0.1:$port/api PREFECT_UI_API_URL=http://127.0.0.1:$port/api

"$venv/bin/prefect" server start --host 127.0.0.1 --port "$port" >"$tmp/server.log" 2>&1 &
server=$!
worker=
stop() {  # the worker before the server it reports to, each with its process group
  for pid in $worker $server; do kill -- "-$pid" 2>/dev/null; while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done; done
  rm -rf "$tmp"
}
trap stop EXIT
for _ in $(seq 90); do curl -sf "$PREFECT_API_URL/health" >/dev/null && break; sleep 1; done

"$venv/bin/python" -c "from pathlib import Path; from strata.tasks.data.demo_batches import write_digit_batches; \
write_digit_batches(Path('$tmp/incoming'))"
"$venv/bin/strata" init "$tmp/ws" >/dev/null
cd "$tmp/ws"
PREFECT_API_URL= "$venv/bin/strata" ingest "$tmp/incoming/batch-1" --learner digits >/dev/null
"$venv/bin/strata" deploy
"$venv/bin/strata" worker >"$tmp/worker.log" 2>&1 &
worker=$!
for _ in $(seq 60); do
  curl -sf -X POST "$PREFECT_API_URL/work_pools/strata/workers/filter" -H 'content-type: application/json' \
    -d '{"offset": 0, "limit": 5}' | grep -q ONLINE && break
  sleep 1
done

chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1500,760 \
  --virtual-time-budget=20000 --screenshot="$root/docs/images/prefect-deployments.png" \
  "http://127.0.0.1:$port/deployments" 2>/dev/null
echo "wrote $root/docs/images/prefect-deployments.png"
