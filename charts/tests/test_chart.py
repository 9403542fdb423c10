"""The machinist Helm chart, checked with the real Helm v4 engine (helm-python-sdk) and
the Kubernetes API schemas (kubernetes-validate). No cluster is needed.

Run with scripts/test-chart.sh.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

import values_table

REPO = values_table.REPO
CHART = values_table.CHART
RELEASE = "machinist"
NAMESPACE = "machinist-system"
# The Kubernetes version the manifests are validated against (strict schemas shipped
# by kubernetes-validate); also the version Helm's offline capabilities report.
KUBE_VERSION = "1.36.0"
CRD_NAME = "machines.machinist.dev"

# Value combinations rendered, linted and validated; each name is a test id.
CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "namespace-scoped": {"watchNamespace": "team-a"},
    "namespace-scoped-release-namespace": {"watchNamespace": NAMESPACE},
    "no-leader-election": {"leaderElection": {"enabled": False}, "replicaCount": 1},
    "service-monitor": {
        "metrics": {
            "serviceMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "5s", "labels": {"release": "prometheus"}},
            "service": {"annotations": {"example.com/scrape": "true"}},
        }
    },
    "no-pdb": {"podDisruptionBudget": {"enabled": False}},
    "pdb-percentage": {"replicaCount": 3, "podDisruptionBudget": {"minAvailable": "50%"}},
    "persistence": {"fakeDriver": {"stateDir": "/data/fake", "persistence": {"existingClaim": "machinist-fake"}}},
    "plugin-images": {
        "plugins": {
            "images": [
                {"image": "registry.example.com/docker-machine-driver-hetzner:5.0.2", "paths": ["/usr/local/bin/docker-machine-driver-hetzner"]},
                {"image": "registry.example.com/dm-drivers:1", "paths": ["/docker-machine-driver-a", "/bin/docker-machine-driver-b"], "pullPolicy": "Always"},
            ]
        }
    },
    "plugin-volume": {"plugins": {"volume": {"persistentVolumeClaim": {"claimName": "machinist-plugins"}}, "dir": "/plugins"}},
    "custom-image": {
        "image": {"repository": "registry.example.com/tools/machinist", "tag": "v9.9.9-rc.1", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
    },
    "resources": {"resources": {"requests": {"cpu": "200m", "memory": "128Mi"}, "limits": {"cpu": 1, "memory": "512Mi"}}},
    "scheduling": {
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "controllers", "effect": "NoSchedule"}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "machinist"}},
                        },
                    }
                ]
            }
        },
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "machinist"}},
            }
        ],
        "podAnnotations": {"example.com/team": "infra"},
        "podLabels": {"example.com/tier": "control"},
        "priorityClassName": "system-cluster-critical",
    },
    "existing-service-account-no-rbac": {
        "serviceAccount": {"create": False, "name": "machinist-sa"},
        "rbac": {"create": False},
    },
    "service-account-annotations": {
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/machinist"}},
        "fullnameOverride": "mach",
    },
    "text-logs-and-tuning": {
        "logFormat": "text",
        "logLevel": "info,kube=warn",
        "concurrency": 0,
        "pollIntervalSeconds": 30,
        "driverTimeoutSeconds": 120,
        "apiTimeoutSeconds": 20,
        "leaderElection": {"leaseName": "machinist-prod", "leaseDurationSeconds": 30, "renewDeadlineSeconds": 20,
                           "retryPeriodSeconds": 4},
        "metrics": {"port": 9090, "service": {"port": 80, "type": "NodePort"}},
    },
}

# Values the schema must reject.
BAD_VALUES: dict[str, dict[str, Any]] = {
    "negative-replicas": {"replicaCount": -1},
    "unknown-top-level-key": {"replicas": 2},
    "unknown-nested-key": {"leaderElection": {"enable": True}},
    "log-format-xml": {"logFormat": "xml"},
    "concurrency-too-large": {"concurrency": 70000},
    "zero-poll-interval": {"pollIntervalSeconds": 0},
    "lease-duration-below-2": {"leaderElection": {"leaseDurationSeconds": 1}},
    "replicas-without-leader-election": {"leaderElection": {"enabled": False}},
    "bad-namespace": {"watchNamespace": "Team_A"},
    "replicas-as-string": {"replicaCount": "2"},
    "existing-service-account-without-name": {"serviceAccount": {"create": False}},
}


# --- helpers -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chart() -> helm.Chart:
    loaded = helm.Chart.load(CHART)
    yield loaded
    loaded.close()


def render_files(chart: helm.Chart, values: dict[str, Any]) -> dict[str, str]:
    return chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders (templates only: Helm renders no CRD)."""
    objects = []
    for path, text in sorted(render_files(chart, values).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                objects.append(doc)
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod["containers"][0]


def args(objects: list[dict[str, Any]]) -> list[str]:
    return container(objects)["args"]


def env(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e for e in container(objects).get("env", [])}


def rules_of(role: dict[str, Any]) -> set[tuple[str, str, str, tuple[str, ...]]]:
    """(apiGroup, resource, verb, resourceNames) for every permission a role grants."""
    grants = set()
    for rule in role["rules"]:
        names = tuple(sorted(rule.get("resourceNames", [])))
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    grants.add((group, resource, verb, names))
    return grants


CONTROLLER_GRANTS = {
    *{("machinist.dev", "machines", v, ()) for v in ("get", "list", "watch", "patch", "update")},
    *{("machinist.dev", "machines/status", v, ()) for v in ("get", "patch", "update")},
    ("machinist.dev", "machines/finalizers", "update", ()),
    *{("", "secrets", v, ()) for v in ("get", "list", "watch", "create", "patch")},
    ("events.k8s.io", "events", "create", ()),
    ("events.k8s.io", "events", "patch", ()),
}
CRD_GRANTS = {("apiextensions.k8s.io", "customresourcedefinitions", v, (CRD_NAME,)) for v in ("get", "list", "watch")}


def lease_grants(lease: str) -> set[tuple[str, str, str, tuple[str, ...]]]:
    return {
        ("coordination.k8s.io", "leases", "create", ()),
        ("coordination.k8s.io", "leases", "get", (lease,)),
        ("coordination.k8s.io", "leases", "update", (lease,)),
    }


def service_account_name(values: dict[str, Any]) -> str:
    sa = values.get("serviceAccount", {})
    return sa.get("name") or values.get("fullnameOverride") or RELEASE


# --- helm lint -----------------------------------------------------------------------


@pytest.mark.parametrize("values", CASES.values(), ids=CASES.keys())
def test_lint_strict(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, copy.deepcopy(values), strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert problems == []


# --- rendering and the Kubernetes schemas --------------------------------------------


def validate_service_monitor(obj: dict[str, Any]) -> None:
    """No schema ships for monitoring.coreos.com: check the shape Prometheus Operator needs."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    assert obj["metadata"]["name"] and obj["metadata"]["namespace"] == NAMESPACE
    spec = obj["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert spec["selector"]["matchLabels"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert spec["endpoints"], "no endpoints"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
        for key in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"([0-9]+(ms|s|m|h))+", endpoint[key]), endpoint[key]


@pytest.mark.parametrize("values", CASES.values(), ids=CASES.keys())
def test_manifests_are_valid_kubernetes_objects(chart: helm.Chart, values: dict[str, Any]) -> None:
    objects = render(chart, values)
    assert objects
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            validate_service_monitor(obj)
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name')}: {e.message} at {list(e.path)}")
        # Every object is named, carries the standard labels, and a namespaced one
        # says its namespace.
        meta = obj["metadata"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", meta["name"]) and len(meta["name"]) <= 63
        labels = meta["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                    "app.kubernetes.io/managed-by", "helm.sh/chart"):
            assert key in labels, f"{obj['kind']}/{meta['name']} lacks label {key}"
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert meta.get("namespace"), f"{obj['kind']}/{meta['name']} has no namespace"


@pytest.mark.parametrize("values", CASES.values(), ids=CASES.keys())
def test_install_dry_run_matches_template(chart: helm.Chart, values: dict[str, Any]) -> None:
    """`helm install --dry-run=client` (the install path: ordering, hooks, notes) renders
    the same objects as the template."""
    config = helm.Config(storage_driver="memory", namespace=NAMESPACE)
    try:
        release = config.install(chart, RELEASE, copy.deepcopy(values), dry_run="client", namespace=NAMESPACE)
    finally:
        config.close()
    installed = [d for d in yaml.safe_load_all(release["manifest"]) if d]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, installed)) == sorted(map(key, render(chart, values)))
    assert f"release {RELEASE} in namespace {NAMESPACE}" in release["notes"]


@pytest.mark.parametrize("values", CASES.values(), ids=CASES.keys())
def test_notes_render(chart: helm.Chart, values: dict[str, Any]) -> None:
    notes = render_files(chart, values)["machinist/templates/NOTES.txt"]
    assert "kubectl apply -f crds/" in notes
    if values.get("watchNamespace"):
        assert f"namespace {values['watchNamespace']} only" in notes


# --- RBAC ----------------------------------------------------------------------------

RBAC_KINDS = ("ClusterRole", "Role")


@pytest.mark.parametrize("values", CASES.values(), ids=CASES.keys())
def test_rbac_has_no_wildcards(chart: helm.Chart, values: dict[str, Any]) -> None:
    for obj in render(chart, values):
        if obj["kind"] not in RBAC_KINDS:
            continue
        for rule in obj["rules"]:
            assert "nonResourceURLs" not in rule
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                for item in rule.get(field, []):
                    assert "*" not in item, f"{obj['kind']}/{obj['metadata']['name']}: {field} has {item!r}"


def test_default_mode_rbac(chart: helm.Chart) -> None:
    objects = render(chart, {})
    cluster_role = one(objects, "ClusterRole")
    assert rules_of(cluster_role) == CONTROLLER_GRANTS | CRD_GRANTS
    # The CRD is readable by name only.
    for rule in cluster_role["rules"]:
        if "apiextensions.k8s.io" in rule["apiGroups"]:
            assert rule["resourceNames"] == [CRD_NAME]
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": cluster_role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]
    # The only Role is the lease's, in the release namespace.
    (role,) = by_kind(objects, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert rules_of(role) == lease_grants("machinist")
    (role_binding,) = by_kind(objects, "RoleBinding")
    assert role_binding["metadata"]["namespace"] == NAMESPACE
    assert role_binding["roleRef"]["name"] == role["metadata"]["name"]
    assert role_binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]


@pytest.mark.parametrize("watch", ["team-a", NAMESPACE])
def test_namespace_scoped_mode_has_no_cluster_rbac(chart: helm.Chart, watch: str) -> None:
    objects = render(chart, {"watchNamespace": watch})
    assert by_kind(objects, "ClusterRole") == []
    assert by_kind(objects, "ClusterRoleBinding") == []
    assert all(o["metadata"].get("namespace") for o in objects)
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in by_kind(objects, "Role")}
    controller_role = roles.pop((watch, RELEASE))
    assert rules_of(controller_role) == CONTROLLER_GRANTS  # and no CRD read: nothing cluster-level
    ((lease_ns, _), lease_role), = roles.items()
    assert lease_ns == NAMESPACE
    assert rules_of(lease_role) == lease_grants("machinist")
    bindings = {(b["metadata"]["namespace"], b["roleRef"]["name"]): b for b in by_kind(objects, "RoleBinding")}
    assert (watch, RELEASE) in bindings
    for binding in bindings.values():
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]


def test_lease_role_follows_lease_name_and_leader_election(chart: helm.Chart) -> None:
    objects = render(chart, {"leaderElection": {"leaseName": "machinist-prod"}})
    (role,) = by_kind(objects, "Role")
    assert rules_of(role) == lease_grants("machinist-prod")
    objects = render(chart, {"leaderElection": {"enabled": False}, "replicaCount": 1})
    assert by_kind(objects, "Role") == [] and by_kind(objects, "RoleBinding") == []
    assert rules_of(one(objects, "ClusterRole")) == CONTROLLER_GRANTS | CRD_GRANTS


def test_rbac_and_service_account_can_be_left_out(chart: helm.Chart) -> None:
    values = CASES["existing-service-account-no-rbac"]
    objects = render(chart, values)
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"}
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "machinist-sa"


def test_service_account_annotations(chart: helm.Chart) -> None:
    values = CASES["service-account-annotations"]
    objects = render(chart, values)
    sa = one(objects, "ServiceAccount")
    assert sa["metadata"]["name"] == "mach"
    assert sa["metadata"]["annotations"] == values["serviceAccount"]["annotations"]
    for binding in by_kind(objects, "ClusterRoleBinding") + by_kind(objects, "RoleBinding"):
        assert binding["subjects"][0]["name"] == "mach"
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "mach"


# --- the pod -------------------------------------------------------------------------


@pytest.mark.parametrize("values", CASES.values(), ids=CASES.keys())
def test_security_context(chart: helm.Chart, values: dict[str, Any]) -> None:
    objects = render(chart, values)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert isinstance(psc["runAsUser"], int) and psc["runAsUser"] > 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    csc = container(objects)["securityContext"]
    assert csc["runAsNonRoot"] is True
    assert csc["runAsUser"] == 65532
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in csc or csc["privileged"] is False


@pytest.mark.parametrize("values", CASES.values(), ids=CASES.keys())
def test_probes_on_the_metrics_port(chart: helm.Chart, values: dict[str, Any]) -> None:
    objects = render(chart, values)
    c = container(objects)
    port = values.get("metrics", {}).get("port", 8080)
    assert c["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert f"--metrics-address=0.0.0.0:{port}" in c["args"]
    service = one(objects, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": values.get("metrics", {}).get("service", {}).get("port", 8080),
                                         "targetPort": "metrics", "protocol": "TCP"}]
    assert service["spec"]["selector"] == one(objects, "Deployment")["spec"]["selector"]["matchLabels"]


def test_default_args_and_env(chart: helm.Chart) -> None:
    objects = render(chart, {})
    assert args(objects) == [
        "run",
        "--concurrency=64",
        "--log-format=json",
        "--fake-state-dir=/var/lib/machinist/fake",
        "--metrics-address=0.0.0.0:8080",
        "--poll-interval=60",
        "--driver-timeout=600",
        "--api-timeout=30",
        "--shutdown-timeout=55",
        "--leader-elect",
        f"--leader-election-namespace={NAMESPACE}",
        "--leader-election-lease=machinist",
        "--leader-election-lease-duration=15",
        "--leader-election-renew-deadline=10",
        "--leader-election-retry-period=2",
    ]
    variables = env(objects)
    assert variables["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert variables["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert variables["RUST_LOG"]["value"] == "info"
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert "strategy" not in deployment["spec"]  # RollingUpdate: the standby takes over


def test_tuning_values_reach_the_args(chart: helm.Chart) -> None:
    objects = render(chart, CASES["text-logs-and-tuning"])
    a = args(objects)
    for expected in ("--log-format=text", "--concurrency=0", "--poll-interval=30", "--driver-timeout=120",
                     "--leader-election-lease=machinist-prod", "--leader-election-lease-duration=30",
                     "--leader-election-renew-deadline=20", "--leader-election-retry-period=4", "--api-timeout=20",
                     "--metrics-address=0.0.0.0:9090"):
        assert expected in a
    assert env(objects)["RUST_LOG"]["value"] == "info,kube=warn"
    # Large numbers stay integers (Helm reads numbers as floats).
    a = args(render(chart, {"driverTimeoutSeconds": 10_000_000}))
    assert "--driver-timeout=10000000" in a


def test_in_flight_calls_are_cut_before_the_pod_is_killed(chart: helm.Chart) -> None:
    objects = render(chart, {"terminationGracePeriodSeconds": 120})
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120
    assert "--shutdown-timeout=115" in args(objects)


def test_leader_election_args(chart: helm.Chart) -> None:
    enabled = args(render(chart, {}))
    assert "--leader-elect" in enabled
    assert any(a.startswith("--leader-election-lease=") for a in enabled)
    objects = render(chart, CASES["no-leader-election"])
    disabled = args(objects)
    assert not [a for a in disabled if a.startswith("--leader-elect")]
    assert not [name for name in env(objects) if name.startswith("MACHINIST_LEADER")]
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("timings", [
    {"renewDeadlineSeconds": 15},  # as long as the lease: two leaders at once
    {"leaseDurationSeconds": 8},  # shorter than the default renew deadline
    {"retryPeriodSeconds": 10},  # no renewal before the deadline
])
def test_leader_election_timings_that_allow_two_leaders_fail_the_render(chart: helm.Chart, timings: dict[str, int]) -> None:
    with pytest.raises(Exception, match="leaderElection"):
        render_files(chart, {"leaderElection": timings})
    assert not [a for a in args(render(chart, {"leaderElection": {**timings, "enabled": False}, "replicaCount": 1}))
                if a.startswith("--leader-election")]


def test_namespace_arg(chart: helm.Chart) -> None:
    assert "--namespace=team-a" in args(render(chart, {"watchNamespace": "team-a"}))
    assert not [a for a in args(render(chart, {})) if a.startswith("--namespace")]


def test_fake_state_volume(chart: helm.Chart) -> None:
    objects = render(chart, {})
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "fake-state", "emptyDir": {}}]
    assert container(objects)["volumeMounts"] == [{"name": "fake-state", "mountPath": "/var/lib/machinist/fake"}]
    objects = render(chart, CASES["persistence"])
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "fake-state", "persistentVolumeClaim": {"claimName": "machinist-fake"}}]
    assert container(objects)["volumeMounts"] == [{"name": "fake-state", "mountPath": "/data/fake"}]
    assert "--fake-state-dir=/data/fake" in args(objects)


def test_plugins_from_images_are_copied_by_init_containers(chart: helm.Chart) -> None:
    objects = render(chart, CASES["plugin-images"])
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    inits = pod["initContainers"]
    assert [i["image"] for i in inits] == [
        "registry.example.com/docker-machine-driver-hetzner:5.0.2",
        "registry.example.com/dm-drivers:1",
    ]
    assert inits[0]["command"] == ["cp", "/usr/local/bin/docker-machine-driver-hetzner", "/plugins/"]
    assert inits[1]["command"] == ["cp", "/docker-machine-driver-a", "/bin/docker-machine-driver-b", "/plugins/"]
    assert inits[1]["imagePullPolicy"] == "Always"
    assert all(i["volumeMounts"] == [{"name": "plugins", "mountPath": "/plugins"}] for i in inits)
    assert all(i["securityContext"]["readOnlyRootFilesystem"] for i in inits), "init containers are as locked down"
    assert {"name": "plugins", "emptyDir": {}} in pod["volumes"]
    assert {"name": "plugin-work", "emptyDir": {}} in pod["volumes"]
    mounts = container(objects)["volumeMounts"]
    assert {"name": "plugins", "mountPath": "/opt/machinist/plugins", "readOnly": True} in mounts
    assert {"name": "plugin-work", "mountPath": "/var/lib/machinist/plugin-work"} in mounts
    assert "--driver-plugin-dir=/opt/machinist/plugins" in args(objects)
    assert "--driver-plugin-work-dir=/var/lib/machinist/plugin-work" in args(objects)
    assert pod["shareProcessNamespace"] is True, "the pause process reaps what plugins leave behind"


def test_plugins_from_a_volume_and_none_by_default(chart: helm.Chart) -> None:
    objects = render(chart, CASES["plugin-volume"])
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert {"name": "plugins", "persistentVolumeClaim": {"claimName": "machinist-plugins"}} in pod["volumes"]
    assert {"name": "plugins", "mountPath": "/plugins", "readOnly": True} in container(objects)["volumeMounts"]
    assert "--driver-plugin-dir=/plugins" in args(objects)
    assert pod["shareProcessNamespace"] is True
    objects = render(chart, {})
    assert not [a for a in args(objects) if a.startswith("--driver-plugin")]
    assert "initContainers" not in one(objects, "Deployment")["spec"]["template"]["spec"]
    assert "shareProcessNamespace" not in one(objects, "Deployment")["spec"]["template"]["spec"]
    with pytest.raises(Exception, match="not both"):
        render_files(chart, {"plugins": {**CASES["plugin-images"]["plugins"], **CASES["plugin-volume"]["plugins"]}})


def test_image(chart: helm.Chart) -> None:
    app_version = chart.metadata["appVersion"]
    objects = render(chart, {})
    assert container(objects)["image"] == f"ghcr.io/machinist-dev/machinist:{app_version}"
    assert container(objects)["imagePullPolicy"] == "IfNotPresent"
    assert "imagePullSecrets" not in one(objects, "Deployment")["spec"]["template"]["spec"]
    objects = render(chart, CASES["custom-image"])
    assert container(objects)["image"] == "registry.example.com/tools/machinist:v9.9.9-rc.1"
    assert container(objects)["imagePullPolicy"] == "Always"
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert one(objects, "Deployment")["metadata"]["labels"]["app.kubernetes.io/version"] == "v9.9.9-rc.1"


def test_resources(chart: helm.Chart) -> None:
    assert container(render(chart, {}))["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"memory": "256Mi"},
    }
    assert container(render(chart, CASES["resources"]))["resources"] == CASES["resources"]["resources"]


def test_scheduling(chart: helm.Chart) -> None:
    values = CASES["scheduling"]
    objects = render(chart, values)
    template = one(objects, "Deployment")["spec"]["template"]
    pod = template["spec"]
    for key in ("nodeSelector", "tolerations", "affinity", "topologySpreadConstraints", "priorityClassName"):
        assert pod[key] == values[key]
    assert template["metadata"]["annotations"] == values["podAnnotations"]
    assert template["metadata"]["labels"]["example.com/tier"] == "control"
    assert one(objects, "Deployment")["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "machinist", "app.kubernetes.io/instance": RELEASE}


def test_pod_disruption_budget(chart: helm.Chart) -> None:
    pdb = one(render(chart, {}), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "machinist", "app.kubernetes.io/instance": RELEASE}
    assert one(render(chart, CASES["pdb-percentage"]), "PodDisruptionBudget")["spec"]["minAvailable"] == "50%"
    assert by_kind(render(chart, CASES["no-pdb"]), "PodDisruptionBudget") == []
    # A single replica gets none: it would block every node drain.
    assert by_kind(render(chart, CASES["no-leader-election"]), "PodDisruptionBudget") == []


def test_service_monitor(chart: helm.Chart) -> None:
    assert by_kind(render(chart, {}), "ServiceMonitor") == []
    objects = render(chart, CASES["service-monitor"])
    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "scheme": "http", "interval": "15s", "scrapeTimeout": "5s"}]
    service = one(objects, "Service")
    assert service["metadata"]["annotations"] == {"example.com/scrape": "true"}
    # The monitor selects the metrics Service.
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()


# --- the CRD -------------------------------------------------------------------------


def test_crd_is_byte_identical_to_the_generated_one(chart: helm.Chart) -> None:
    shipped = (CHART / "crds" / "machine.yaml").read_bytes()
    assert shipped == (REPO / "crds" / "machine.yaml").read_bytes(), (
        "charts/machinist/crds/machine.yaml is stale: cp crds/machine.yaml charts/machinist/crds/")
    assert [c["filename"] for c in chart.crds] == ["machinist/crds/machine.yaml"]
    crd = yaml.safe_load(shipped)
    assert crd["metadata"]["name"] == CRD_NAME
    kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)


# --- values.schema.json --------------------------------------------------------------


@pytest.mark.parametrize("values", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_bad_values(chart: helm.Chart, values: dict[str, Any]) -> None:
    report = helm.lint(CHART, copy.deepcopy(values), strict=True, namespace=NAMESPACE)
    assert report["errors"], f"lint accepted {values}"
    with pytest.raises(helm.HelmValuesError):
        render_files(chart, values)
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values(copy.deepcopy(values)))


def test_schema_accepts_the_defaults(chart: helm.Chart) -> None:
    chart.validate_schema(chart.merge_values({}))
    chart.validate_schema(chart.values)


# --- the README ----------------------------------------------------------------------


def test_every_value_has_a_schema_description() -> None:
    missing = [key for key, _, node in values_table.value_keys() if not node.get("description")]
    assert missing == [], f"values.schema.json has no description for {missing}"


def test_readme_documents_every_value() -> None:
    documented = values_table.readme_keys()
    keys = [key for key, _, _ in values_table.value_keys()]
    hint = "regenerate the table with: .venv/bin/python charts/tests/values_table.py"
    assert sorted(set(keys) - set(documented)) == [], f"values missing from README.md's table; {hint}"
    assert sorted(set(documented) - set(keys)) == [], f"README.md documents keys values.yaml lacks; {hint}"
    assert len(documented) == len(set(documented)), "a key is documented twice"


# --- the chart and the binary agree --------------------------------------------------

# Each flag the chart passes, and the environment variable `machinist run` reads it from.
FLAG_ENV = {
    "--namespace": "MACHINIST_NAMESPACE",
    "--concurrency": "MACHINIST_CONCURRENCY",
    "--log-format": "MACHINIST_LOG_FORMAT",
    "--fake-state-dir": "MACHINIST_FAKE_STATE_DIR",
    "--metrics-address": "MACHINIST_METRICS_ADDRESS",
    "--poll-interval": "MACHINIST_POLL_INTERVAL",
    "--driver-timeout": "MACHINIST_DRIVER_TIMEOUT",
    "--shutdown-timeout": "MACHINIST_SHUTDOWN_TIMEOUT",
    "--leader-elect": "MACHINIST_LEADER_ELECT",
    "--leader-election-namespace": "MACHINIST_LEADER_ELECTION_NAMESPACE",
    "--leader-election-lease": "MACHINIST_LEADER_ELECTION_LEASE",
    "--leader-election-lease-duration": "MACHINIST_LEADER_ELECTION_LEASE_DURATION",
    "--leader-election-renew-deadline": "MACHINIST_LEADER_ELECTION_RENEW_DEADLINE",
    "--leader-election-retry-period": "MACHINIST_LEADER_ELECTION_RETRY_PERIOD",
    "--api-timeout": "MACHINIST_API_TIMEOUT",
    "--driver-plugin-dir": "MACHINIST_DRIVER_PLUGIN_DIR",
    "--driver-plugin-work-dir": "MACHINIST_DRIVER_PLUGIN_WORK_DIR",
}


def declared_flags() -> dict[str, str | None]:
    """`--flag` -> its environment variable, for every clap argument declared with
    `#[arg(long, ...)]` in the controller's source."""
    flags: dict[str, str | None] = {}
    for path in sorted((REPO / "controller" / "src").rglob("*.rs")):
        for attrs, field in re.findall(r"#\[arg\(((?:[^()]|\([^()]*\))*)\)\]\s*(?:pub\s+)?(\w+)\s*:", path.read_text()):
            long = re.search(r'\blong\s*(?:=\s*"([^"]+)")?', attrs)
            if not long:
                continue
            env_var = re.search(r'\benv\s*=\s*"([^"]+)"', attrs)
            flags["--" + (long.group(1) or field.replace("_", "-"))] = env_var.group(1) if env_var else None
    return flags


def test_every_flag_the_chart_passes_exists_in_machinist_run(chart: helm.Chart) -> None:
    """A flag `machinist run` does not know would crash the pod: each one the chart passes
    is declared with clap in the controller's source, with the environment variable the
    README documents."""
    declared = declared_flags()
    assert "--concurrency" in declared, "cannot read the clap declarations in controller/src"
    passed = set()
    for values in CASES.values():
        for arg in args(render(chart, values))[1:]:
            passed.add(arg.split("=", 1)[0])
    assert passed == set(FLAG_ENV), "update FLAG_ENV"
    missing = sorted(passed - set(declared))
    assert missing == [], f"machinist run does not declare {missing}"
    assert {flag: declared[flag] for flag in passed} == {flag: FLAG_ENV[flag] for flag in passed}
