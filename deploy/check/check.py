"""Offline checks of deploy/, run by deploy/check/run from `make test`.

Renders each kustomization with `kubectl kustomize` (no cluster needed), validates
every core object with kubernetes-validate against the oldest and the newest
Kubernetes this targets, checks the Prometheus Operator objects (whose schemas
kubernetes-validate lacks) by their required keys, cross-checks what must agree
between files (ports, probes, selectors, Secret names, the budget comment), lints the
Dockerfile with hadolint, parses the dashboard, runs promtool on the alert rules and
their unit tests, and refuses any dashboard or alert expression that names a metric
outside the contract in deploy/METRICS.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Callable

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
TOOLS = Path(os.environ.get("DEPLOY_TOOLS", ROOT / "target" / "deploy-tools"))
KUBECTL = TOOLS / "venv" / "bin" / "kubectl"
HADOLINT = TOOLS / "venv" / "bin" / "hadolint"
PROMTOOL = TOOLS / "promtool"

# The oldest Kubernetes the manifests target (the preStop `sleep` action is on by
# default from 1.30) and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# What each kustomization is: the data plane (the base, which leaves its Secrets to an
# overlay, or a complete overlay), or the migration Job.
KUSTOMIZATIONS = {
    K8S / "base": "dataplane",
    K8S / "overlays" / "example": "dataplane, complete",
    K8S / "migrate": "migrate",
}
# What may be left for the operator to create: the base's Secrets (every overlay must
# define them) and the migration's administrator URL (created for the run only).
SUPPLIED_BY_OVERLAY = {
    ("Secret", "postgres-admin"),
    ("Secret", "pooler-auth"),
    ("Secret", "pooler-tls"),
    ("Secret", "provisioner-db"),
    ("Secret", "provisioner-api-token"),
    ("ConfigMap", "postgres-ca"),
}
CRD_GROUP = "monitoring.coreos.com/"


class Failed(Exception):
    pass


def require(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


def run(cmd: list[str], cwd: Path | None = None) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise Failed(f"{' '.join(map(str, cmd))} exited {out.returncode}:\n{out.stdout}{out.stderr}")
    return out.stdout


# --- the contract -------------------------------------------------------------------

def contract() -> set[str]:
    text = (DEPLOY / "METRICS.md").read_text()
    names = set(re.findall(r"\b(?:dataplane_pooler|provisioner|process)_[a-z0-9_]*[a-z0-9]\b", text))
    names.add("up")
    # A histogram's series.
    for name in list(names):
        if name.endswith("_seconds"):
            names.update({name + "_bucket", name + "_sum", name + "_count"})
    return names


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                "and", "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label
    matchers, ranges, grouping clauses, numbers and function calls are taken out."""
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+\S+", " ", e)
    e = re.sub(r"(?<![\w$])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w$])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group(0) in PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names


def check_metric_extraction() -> None:
    got = metric_names(
        'histogram_quantile(0.95, sum by (pod, le) (rate(a_seconds_bucket{x="y(z)"}[5m])))'
        ' / on (pod) group_left b_total offset 1h > 1e3 and topk(10, c{d=~"$e"})'
    )
    require(got == {"a_seconds_bucket", "b_total", "c"}, f"metric_names is broken: {got}")


def check_names(where: str, exprs: list[str], allowed: set[str]) -> None:
    unknown = {}
    for expr in exprs:
        for name in metric_names(expr) - allowed:
            unknown.setdefault(name, expr)
    require(not unknown, f"{where} uses metrics outside deploy/METRICS.md: "
            + "; ".join(f"{n} in {e!r}" for n, e in sorted(unknown.items())))


# --- rendering and schemas ----------------------------------------------------------

def render(kustomization: Path) -> list[dict]:
    text = run([str(KUBECTL), "kustomize", str(kustomization)])
    return [d for d in yaml.safe_load_all(text) if d]


def check_kustomization_files(kustomization: Path) -> None:
    k = yaml.safe_load((kustomization / "kustomization.yaml").read_text())
    listed = list(k.get("resources", []))
    for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        listed += [f.split("=", 1)[-1] for f in gen.get("files", [])]
    for entry in listed:
        require((kustomization / entry).exists(), f"{kustomization}: {entry} does not exist")


def validate_objects(docs: list[dict]) -> None:
    errors = []
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUP):
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{doc['kind']}/{doc['metadata']['name']} ({version}): "
                              f"{e.message} at {'.'.join(map(str, e.path))}")
    require(not errors, "\n".join(errors))


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    # A generated ConfigMap's name ends in a hash of its content.
    found = [d for d in by_kind(docs, kind)
             if re.fullmatch(re.escape(name) + r"(-[a-z0-9]{10})?", d["metadata"]["name"])]
    require(len(found) == 1, f"expected one {kind} {name}, found {len(found)}")
    return found[0]


def selects(selector: dict, labels: dict) -> bool:
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        op = e["operator"]
        if (op == "In" and value not in e["values"]) or (op == "NotIn" and value in e["values"]) \
                or (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
    return True


# --- what must agree ----------------------------------------------------------------

def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    return [(d["metadata"]["name"], d["spec"]["template"]) for d in docs
            if d["kind"] in ("Deployment", "Job")]


def check_hardening(docs: list[dict]) -> None:
    templates = pod_templates(docs)
    require(templates, "no workload")
    for name, template in templates:
        pod = template["spec"]
        require(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{name}: runAsNonRoot")
        require(pod.get("automountServiceAccountToken") is False, f"{name}: mounts an API token")
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            where = f"{name}/{c['name']}"
            require(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem")
            require(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation")
            require(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities")
            res = c.get("resources", {})
            require("cpu" in res.get("requests", {}) and "memory" in res.get("requests", {})
                    and "memory" in res.get("limits", {}), f"{where}: resources")


def check_deployments(docs: list[dict]) -> None:
    for d in by_kind(docs, "Deployment"):
        name = d["metadata"]["name"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        require(d["spec"].get("replicas", 1) >= 2, f"{name}: fewer than 2 replicas")
        require(selects(d["spec"]["selector"], labels), f"{name}: the selector does not match the pod template")
        for c in d["spec"]["template"]["spec"]["containers"]:
            where = f"{name}/{c['name']}"
            require("readinessProbe" in c and "livenessProbe" in c, f"{where}: probes")
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                port = c[probe]["httpGet"]["port"]
                require(port in ports, f"{where}: {probe} uses port {port}, not a container port")
        require(any(selects(pdb["spec"]["selector"], labels) for pdb in by_kind(docs, "PodDisruptionBudget")),
                f"{name}: no PodDisruptionBudget selects its pods")


def pooler_container(docs: list[dict]) -> tuple[dict, dict]:
    d = one(docs, "Deployment", "pooler")
    pod = d["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == "pooler")


def check_pooler(docs: list[dict]) -> None:
    config = tomllib.loads((K8S / "base" / "pooler.toml").read_text())
    pod, c = pooler_container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    require(ports.get("pg") == int(config["listen"].rsplit(":", 1)[1]),
            "container port pg differs from pooler.toml's listen")
    require(ports.get("admin") == int(config["admin_listen"].rsplit(":", 1)[1]),
            "container port admin differs from pooler.toml's admin_listen")
    require(c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}, "readiness probe")
    require(c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}, "liveness probe")
    svc = one(docs, "Service", "pooler")
    require(svc["spec"]["ports"] == [{"name": "pg", "port": 5432, "targetPort": "pg", "protocol": "TCP"}],
            "the Service pooler exposes exactly 5432 → pg")
    env = {e["name"]: e for e in c["env"]}
    grace = int(env["POOLER_SHUTDOWN_GRACE_SECS"]["value"])
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    require(pod["terminationGracePeriodSeconds"] > grace + pre_stop,
            "terminationGracePeriodSeconds must exceed the drain grace plus the preStop sleep")
    # The budget: max_server_connections is cluster B's whole budget, shared by the
    # replicas through the registry; no replica count is baked into it.
    text = (K8S / "base" / "pooler.toml").read_text()
    m = re.search(r"Here B = (\d+), shared by every replica", text)
    require(m is not None, "pooler.toml's budget comment is missing")
    require(int(m.group(1)) == config["max_server_connections"],
            f"pooler.toml: max_server_connections {config['max_server_connections']} is not B {m.group(1)}")
    require(not re.search(r"replicas: \d+ each|B / replicas", text),
            "pooler.toml divides the budget by a replica count again")
    # Cancel forwarding: each replica advertises its pod IP on the client port.
    require(env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP",
            "POD_IP from the downward API")
    require(env.get("POOLER_ADVERTISE_ADDR", {}).get("value") == f"$(POD_IP):{ports.get('pg')}",
            "POOLER_ADVERTISE_ADDR is the pod IP and the pg port")
    volumes = {v["name"]: v for v in pod["volumes"]}
    require(volumes["config"]["configMap"]["name"].startswith("pooler-config"), "config volume")
    for mount in c["volumeMounts"]:
        require("subPath" not in mount, f"{mount['name']}: a subPath mount never sees updates")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    for key, volume in [(("client_tls", "cert_file"), "tls"), (("client_tls", "key_file"), "tls"),
                        (("server_tls", "ca_file"), "postgres-ca")]:
        path = config[key[0]][key[1]]
        require(path.startswith(mounts[volume] + "/"), f"pooler.toml {'.'.join(key)} is not under {volume}")
    require(env["POOLER_CONFIG"]["value"] == mounts["config"] + "/pooler.toml", "POOLER_CONFIG")


def references(docs: list[dict]) -> set[tuple[str, str, str | None]]:
    """(kind, name, key) of every Secret and ConfigMap the workloads read."""
    refs = set()
    for _, template in pod_templates(docs):
        pod = template["spec"]
        for v in pod.get("volumes", []):
            if "secret" in v:
                refs.add(("Secret", v["secret"]["secretName"], None))
            if "configMap" in v:
                refs.add(("ConfigMap", v["configMap"]["name"], None))
        for c in pod["containers"]:
            for e in c.get("env", []):
                src = e.get("valueFrom", {})
                if "secretKeyRef" in src:
                    refs.add(("Secret", src["secretKeyRef"]["name"], src["secretKeyRef"]["key"]))
    return refs


def check_references(docs: list[dict], complete: bool) -> None:
    present = {}
    for d in docs:
        if d["kind"] in ("Secret", "ConfigMap"):
            present[(d["kind"], d["metadata"]["name"])] = set(d.get("data", {})) | set(d.get("stringData", {}))
    missing = []
    for kind, name, key in sorted(references(docs), key=str):
        if (kind, name) not in present:
            if complete or (kind, name) not in SUPPLIED_BY_OVERLAY:
                missing.append(f"{kind} {name}")
        elif key is not None and key not in present[(kind, name)]:
            missing.append(f"{kind} {name} key {key}")
    require(not missing, "referenced but not defined: " + ", ".join(missing))
    if complete:
        pooler_tls = present.get(("Secret", "pooler-tls"), set())
        require({"tls.crt", "tls.key"} <= pooler_tls, "pooler-tls needs tls.crt and tls.key")
        require("ca.crt" in present.get(("ConfigMap", "postgres-ca"), set()), "postgres-ca needs ca.crt")


def check_network_policies(docs: list[dict]) -> None:
    pods = [d["spec"]["template"] for d in by_kind(docs, "Deployment")]
    for np in by_kind(docs, "NetworkPolicy"):
        name = np["metadata"]["name"]
        selector = np["spec"]["podSelector"]
        chosen = [p for p in pods if selects(selector, p["metadata"]["labels"])]
        require(chosen, f"NetworkPolicy {name} selects no pod")
        ports = {p["name"] for t in chosen for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for rule in np["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                require(isinstance(p["port"], int) or p["port"] in ports,
                        f"NetworkPolicy {name}: port {p['port']} is not a port of its pods")
    default = [np for np in by_kind(docs, "NetworkPolicy") if np["spec"]["podSelector"] == {}]
    require(any(set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"} for np in default),
            "no default-deny policy")

    def ingress_ports(app: str, namespace_label: str) -> set:
        found = set()
        for np in by_kind(docs, "NetworkPolicy"):
            if not selects(np["spec"]["podSelector"], {"app.kubernetes.io/name": app}):
                continue
            for rule in np["spec"].get("ingress", []):
                if any(namespace_label in f.get("namespaceSelector", {}).get("matchLabels", {})
                       for f in rule.get("from", [])):
                    found |= {p["port"] for p in rule.get("ports", [])}
        return found

    # Replicas forward cancel requests to each other's client port, in and out.
    pooler = {"app.kubernetes.io/name": "pooler"}
    peer_in = any(
        selects(np["spec"]["podSelector"], pooler)
        and any(any(selects(f.get("podSelector", {"matchLabels": {"-": "-"}}), pooler) for f in r.get("from", []))
                and any(p["port"] == "pg" for p in r.get("ports", []))
                for r in np["spec"].get("ingress", []))
        for np in by_kind(docs, "NetworkPolicy"))
    peer_out = any(
        selects(np["spec"]["podSelector"], pooler)
        and any(any(selects(t.get("podSelector", {"matchLabels": {"-": "-"}}), pooler) for t in r.get("to", []))
                and any(p["port"] in (5432, "pg") for p in r.get("ports", []))
                for r in np["spec"].get("egress", []))
        for np in by_kind(docs, "NetworkPolicy"))
    require(peer_in and peer_out, "pooler replicas must reach each other's pg port (cancel forwarding)")

    apps, control = "dataplane.talkide.io/apps", "dataplane.talkide.io/control-plane"
    require(ingress_ports("pooler", apps) == {"pg"}, "app namespaces must reach the pooler's pg port only")
    require(ingress_ports("provisioner", apps) == set(), "app namespaces must not reach the provisioner")
    require(ingress_ports("provisioner", control) == {"http"}, "the control plane must reach the provisioner")


def check_monitoring(docs: list[dict], allowed: set[str]) -> None:
    services = by_kind(docs, "Service")
    for sm in by_kind(docs, "ServiceMonitor"):
        name = sm["metadata"]["name"]
        spec = sm.get("spec", {})
        require(spec.get("selector", {}).get("matchLabels"), f"ServiceMonitor {name}: selector")
        require(spec.get("endpoints"), f"ServiceMonitor {name}: endpoints")
        chosen = [s for s in services if selects(spec["selector"], s["metadata"].get("labels", {}))]
        require(len(chosen) == 1, f"ServiceMonitor {name} selects {len(chosen)} Services, expected 1")
        port_names = {p["name"] for p in chosen[0]["spec"]["ports"]}
        for ep in spec["endpoints"]:
            require(ep.get("port") in port_names, f"ServiceMonitor {name}: no port {ep.get('port')}")
            require(ep.get("path", "/metrics") == "/metrics", f"ServiceMonitor {name}: path")
    rules = by_kind(docs, "PrometheusRule")
    require(len(rules) == 1, "expected one PrometheusRule")
    exprs = []
    for group in rules[0]["spec"]["groups"]:
        require(group.get("name") and group.get("rules"), "a rule group needs a name and rules")
        for r in group["rules"]:
            require("alert" in r and "expr" in r, f"rule {r}: alert and expr")
            require(r.get("labels", {}).get("severity") in {"critical", "warning", "info"},
                    f"{r['alert']}: severity")
            require({"summary", "description"} <= set(r.get("annotations", {})),
                    f"{r['alert']}: summary and description")
            exprs.append(r["expr"])
    check_names("the alert rules", exprs, allowed)
    alerts = {r["alert"] for g in rules[0]["spec"]["groups"] for r in g["rules"]}
    for needed in ("PoolerPoolSaturated", "PoolerAuthFailureSpike", "PoolerPassthroughMismatch",
                   "PoolerBudgetExhausted"):
        require(needed in alerts, f"alert {needed} is missing")


def check_promtool(docs: list[dict]) -> None:
    groups = one(docs, "PrometheusRule", "dataplane")["spec"]["groups"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
        run([str(PROMTOOL), "check", "rules", "rules.yaml"], cwd=work)
        # promtool compares annotations exactly; the unit tests test when alerts fire.
        for g in groups:
            for r in g["rules"]:
                r.pop("annotations", None)
        (work / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
        shutil.copy(DEPLOY / "check" / "alerts.test.yaml", work)
        run([str(PROMTOOL), "test", "rules", "alerts.test.yaml"], cwd=work)


def check_dashboard(allowed: set[str]) -> None:
    dash = json.loads((K8S / "base" / "grafana-dashboard.json").read_text())
    require(dash.get("uid") and dash.get("title"), "dashboard uid and title")
    panels = dash["panels"] + [p for row in dash["panels"] for p in row.get("panels", [])]
    ids = [p["id"] for p in panels]
    require(len(ids) == len(set(ids)), "dashboard panel ids repeat")
    variables = {v["name"] for v in dash["templating"]["list"]}
    exprs = []
    for p in panels:
        if p["type"] == "row":
            continue
        require(p.get("targets"), f"panel {p['title']!r} has no query")
        require(p["datasource"]["uid"] == "${datasource}", f"panel {p['title']!r}: datasource")
        for t in p["targets"]:
            exprs.append(t["expr"])
            for var in re.findall(r"\$(\w+)", t["expr"]):
                require(var.startswith("__") or var in variables,
                        f"panel {p['title']!r} uses an undefined variable ${var}")
    check_names("the dashboard", exprs, allowed)
    for panel_needed in ("pass-through", "budget", "checkout wait", "logins"):
        require(any(panel_needed in p["title"].lower() for p in panels), f"no {panel_needed} panel")


def check_dockerfile() -> None:
    run([str(HADOLINT), "--no-color", str(DEPLOY / "Dockerfile")])
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    require(len(stages) >= 2, "the Dockerfile must be multi-stage")
    require("distroless" in stages[-1] or stages[-1] == "scratch", "the runtime stage is not distroless")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    require(users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0",
            "the image must end as a numeric non-root USER (for runAsNonRoot)")
    for binary in ("pooler", "provisioner"):
        require(f"/out/{binary}" in text, f"the image lacks {binary}")


# --- driver ---------------------------------------------------------------------------

def main() -> int:
    for tool in (KUBECTL, HADOLINT, PROMTOOL):
        if not tool.exists():
            print(f"deploy-check: {tool} is missing: run .ci/install-deps (or deploy/check/install)",
                  file=sys.stderr)
            return 1
    allowed = contract()
    rendered: dict[Path, list[dict]] = {}
    checks: list[tuple[str, Callable[[], None]]] = [("PromQL name extraction", check_metric_extraction)]
    for k, what in KUSTOMIZATIONS.items():
        rel = k.relative_to(ROOT)

        def load(k=k):
            check_kustomization_files(k)
            rendered[k] = render(k)
        checks += [
            (f"{rel}: renders", load),
            (f"{rel}: Kubernetes schemas {' and '.join(KUBERNETES_VERSIONS)}",
             lambda k=k: validate_objects(rendered[k])),
            (f"{rel}: non-root, read-only, no privileges, resources", lambda k=k: check_hardening(rendered[k])),
            (f"{rel}: Secrets and ConfigMaps referenced exist",
             lambda k=k, c="complete" in what: check_references(rendered[k], c)),
        ]
        if what.startswith("dataplane"):
            checks += [
                (f"{rel}: Deployments replicated, probed, disruption budgets",
                 lambda k=k: check_deployments(rendered[k])),
                (f"{rel}: pooler ports, probes, drain, budget", lambda k=k: check_pooler(rendered[k])),
                (f"{rel}: NetworkPolicies", lambda k=k: check_network_policies(rendered[k])),
                (f"{rel}: ServiceMonitors and PrometheusRule",
                 lambda k=k: check_monitoring(rendered[k], allowed)),
            ]
    checks += [
        ("alert rules: promtool check and unit tests", lambda: check_promtool(rendered[K8S / "base"])),
        ("Grafana dashboard", lambda: check_dashboard(allowed)),
        ("Dockerfile: hadolint, stages, user, binaries", check_dockerfile),
    ]
    passed = failed = 0
    for name, check in checks:
        try:
            check()
        except Failed as e:
            failed += 1
            print(f"deploy-check: FAILED {name}\n  " + str(e).replace("\n", "\n  "))
        except (KeyError, StopIteration, TypeError) as e:
            failed += 1
            print(f"deploy-check: FAILED {name}: missing or malformed {e!r}")
        else:
            passed += 1
            print(f"deploy-check: ok {name}")
    print(f"deploy-check: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
