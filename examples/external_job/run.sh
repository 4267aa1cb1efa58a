#!/usr/bin/env bash
# The headline flow without runners: a CI step creates an external job, hands its one-time
# continue URL to another system and is done; that system finishes the job through the URL.
#
#   GATEWAY_URL=http://127.0.0.1:8080 GATEWAY_TOKEN=... ./run.sh
#
# Progress goes to stderr; the finished job (JSON) to stdout.
set -euo pipefail

: "${GATEWAY_URL:?set GATEWAY_URL to the gateway address, e.g. http://127.0.0.1:8080}"
: "${GATEWAY_TOKEN:?set GATEWAY_TOKEN to an API token (the admin token file of gateway serve)}"
PYTHON="${PYTHON:-python3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

field() { "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

echo "==> creating an external job" >&2
job="$(gateway job create provision-node --callback-timeout-s 600)"
job_id="$(field id <<<"$job")"
continue_url="$(field continue_url <<<"$job")"
echo "==> job $job_id is $(field state <<<"$job"); handing its continue URL over" >&2

# The external system gets the URL and nothing else: no API token in its environment.
env -u GATEWAY_TOKEN "$PYTHON" "$here/external_system.py" "$continue_url"

echo "==> the job as the gateway sees it now" >&2
gateway job get "$job_id"
