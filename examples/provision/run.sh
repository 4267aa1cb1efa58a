#!/usr/bin/env bash
# The whole example on one machine: a gateway, a runner, the provisioner, and the pipeline
# followed until it ends. Everything lives in a temporary directory and is stopped on exit.
#
#   PATH="$PWD/.venv/bin:$PATH" examples/provision/run.sh
#
# The exit code is the pipeline's: 0 only when it ends in success.
# PYTHON picks the interpreter for provisioner.py (default python3, standard library only);
# PROVISION_DELAY_S how long the provisioner takes (default 5).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d)"
pids=()

cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# The first http:// address printed in FILE, waiting up to 20 s for it.
address_in() {
    local file="$1" address=""
    for _ in $(seq 200); do
        address="$(grep -o -m1 'http://[^ ]*' "$file" 2>/dev/null || true)"
        [[ -n "$address" ]] && { echo "$address"; return 0; }
        sleep 0.1
    done
    echo "no address in $file:" >&2; cat "$file" >&2; return 1
}

echo "==> starting the gateway" >&2
gateway serve --port 0 --data-dir "$work/gateway" >"$work/gateway.log" 2>&1 &
pids+=($!)
url="$(address_in "$work/gateway.log")"
for _ in $(seq 200); do curl -fs "$url/readyz" >/dev/null && break; sleep 0.1; done
echo "    $url" >&2

echo "==> registering and starting a runner" >&2
runner_token="$(gateway runner register --url "$url" --data-dir "$work/gateway" \
    --description "provision example" \
    | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["token"])')"
GATEWAY_RUNNER_TOKEN="$runner_token" gateway runner --url "$url" >"$work/runner.log" 2>&1 &
pids+=($!)

echo "==> starting the provisioner" >&2
"$PYTHON" "$here/provisioner.py" --port 0 --delay-s "${PROVISION_DELAY_S:-5}" \
    >"$work/provisioner.log" 2>&1 &
pids+=($!)
provisioner_url="$(address_in "$work/provisioner.log")"
echo "    $provisioner_url" >&2

echo "==> running the pipeline" >&2
status=0
gateway pipeline run "$here/pipeline.yml" --follow --url "$url" --data-dir "$work/gateway" \
    --var "PROVISIONER_URL=$provisioner_url" || status=$?

echo "==> the traces" >&2
token="$(cat "$work/gateway/admin-token")"
pipeline_id="$(curl -fs -H "Authorization: Bearer $token" "$url/api/v1/pipelines?limit=1" \
    | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["items"][0]["id"])')"
curl -fs -H "Authorization: Bearer $token" "$url/api/v1/pipelines/$pipeline_id" \
    | "$PYTHON" -c 'import json, sys; [print(j["id"], j["name"]) for j in json.load(sys.stdin)["jobs"]]' \
    | while read -r job_id name; do
        echo "--- $name"
        curl -fs -H "Authorization: Bearer $token" "$url/api/v1/jobs/$job_id/trace"
    done
exit "$status"
