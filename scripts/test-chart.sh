#!/usr/bin/env bash
# Tests the Helm chart (charts/machinist) and the Dockerfile without a cluster or a
# Docker engine: helm lint and template with the real Helm v4 engine (helm-python-sdk),
# every manifest validated against the Kubernetes API schemas (kubernetes-validate),
# RBAC, security context, values schema, README values table, CRD copy, Dockerfile.
# Installs what it needs into .venv (once); then takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

requirements=charts/tests/requirements.txt
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# Install only when the requirements changed since the last install.
stamp="$venv/.chart-requirements"
if ! cmp -s "$requirements" "$stamp"; then
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$stamp"
fi

PYTHONDONTWRITEBYTECODE=1 exec "$venv/bin/python" -m pytest -q -p no:cacheprovider charts/tests "$@"
