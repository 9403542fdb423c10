#!/usr/bin/env bash
# Runs machinist with no cluster: starts the e2e test API server on a loopback port,
# installs the Machine CRD, and runs the controller in the foreground (Ctrl-C stops
# both). Use kubectl from another terminal:
#   export KUBECONFIG=$PWD/.sandbox/kubeconfig
#   kubectl apply -f examples/fake-machine.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
port=${SANDBOX_PORT:-16443}
dir=$PWD/.sandbox
mkdir -p "$dir/fake"

if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "sandbox: port $port is taken; set SANDBOX_PORT to a free port (SANDBOX_PORT=16444 $0)" >&2
  exit 1
fi

cargo build -q -p machinist -p machinist-test-apiserver
rm -f "$dir/kubeconfig"
./target/debug/test-apiserver --port "$port" --kubeconfig "$dir/kubeconfig" >"$dir/apiserver.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
for _ in $(seq 50); do [ -s "$dir/kubeconfig" ] && break; sleep 0.1; done
if [ ! -s "$dir/kubeconfig" ]; then
  echo "sandbox: the test API server did not start on port $port (set SANDBOX_PORT to another):" >&2
  tail -5 "$dir/apiserver.log" >&2
  exit 1
fi
export KUBECONFIG=$dir/kubeconfig
kubectl apply -f crds/machine.yaml >/dev/null
echo "test API server on http://127.0.0.1:$port; in another terminal:"
echo "  export KUBECONFIG=$dir/kubeconfig"
echo "  kubectl apply -f examples/fake-machine.yaml && kubectl wait --for=condition=Ready machine/demo"
./target/debug/machinist run --fake-state-dir "$dir/fake" --metrics-address 127.0.0.1:18080 "$@"
