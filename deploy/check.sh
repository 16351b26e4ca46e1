#!/usr/bin/env bash
# Validates what can be validated without a Docker engine or a cluster:
# the Kubernetes manifests against their schemas, the compose file with `compose config`,
# and the wheel the image installs (it must carry the price table and the console).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

"$VENV/bin/kubernetes-validate" --strict deploy/k8s/*.yaml

compose=()
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq >/dev/null && apt-get install -y -qq docker-compose >/dev/null
  compose=(docker-compose)
fi
if [ ${#compose[@]} -gt 0 ]; then
  BEDROCK_PROXY_MASTER_KEY=validate-only "${compose[@]}" -f deploy/docker-compose.yml config -q
  echo "deploy/docker-compose.yml: valid"
elif [ "${CI:-}" = true ]; then
  echo "no docker compose to validate deploy/docker-compose.yml" >&2; exit 1
else
  echo "skipped: no docker compose here to validate deploy/docker-compose.yml" >&2
fi

rm -rf build/deploy-wheel
"$VENV/bin/python" -m pip wheel -q --no-deps -w build/deploy-wheel . 2>/dev/null
"$VENV/bin/python" - <<'PY'
import glob, zipfile
wheel = glob.glob("build/deploy-wheel/bedrock_proxy-*.whl")[0]
names = zipfile.ZipFile(wheel).namelist()
assert "proxy/data/prices.json" in names, "the wheel lacks proxy/data/prices.json"
for asset in ("templates/base.html", "templates/spend.html", "static/console.js", "static/console.css"):
    assert f"proxy/server/fronts/console/{asset}" in names, f"the wheel lacks the console's {asset}"
print(f"{wheel}: {len(names)} files, price table and console assets included")
PY
