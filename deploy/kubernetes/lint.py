#!/usr/bin/env python3
"""Validate splice-proxy's Kubernetes manifests and lint their security settings.

    kubectl kustomize deploy/kubernetes/overlays/example | python3 deploy/kubernetes/lint.py -
    python3 deploy/kubernetes/lint.py deploy/kubernetes/base/*.yaml     # without kustomize

Every object is validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
unknown fields are errors). Then the rules the README's "Deployment" section promises:

- no container is privileged, none may escalate privileges, every root filesystem is read-only;
- capabilities: drop ALL, add only CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, all three together
  and only with --mode=sockmap (the one data path that loads eBPF);
- a pod that adds no capability runs as non-root (runAsNonRoot, a non-zero runAsUser);
- seccomp RuntimeDefault, no hostPath volume, no host PID/IPC, no service account token;
- requests and limits for CPU and memory; /readyz and /healthz probes on the metrics port;
- a RollingUpdate with maxUnavailable, tolerations, Prometheus scrape annotations;
- the proxy never runs open: --htpasswd, --credentials-file or --credentials, never
  --allow-anonymous;
- a Secret volume is mounted whole, never with subPath (kubelet never updates a subPath
  mount, and the proxy rereads its credentials when the Secret changes);
- a Service selects the DaemonSet's pods; the Secret holds an htpasswd key.

`--migrationcontroller FILE` also checks the MTC snippet (a custom resource, so no schema).
Prints one line per problem and exits 1 if there is any; 0 and a summary otherwise.
"""

import argparse
import re
import sys

import kubernetes_validate
import yaml

ALLOWED_CAPS = {"BPF", "NET_ADMIN", "PERFMON"}
METRICS_PORT = 9128


def load(paths):
    docs = []
    for path in paths:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def validate_schemas(docs, version, problems):
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            problems.append(f"{path}: {name_of(doc)}: schema: {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{path}: {name_of(doc)}: no schema for it in {version}: {e}")


def port_number(container, port):
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def lint_pod(where, meta, spec, problems):
    bad = lambda msg: problems.append(f"{where}: {msg}")  # noqa: E731
    pod_sc = spec.get("securityContext") or {}
    for key in ("hostPID", "hostIPC"):
        if spec.get(key):
            bad(f"{key} is set")
    if spec.get("automountServiceAccountToken") is not False:
        bad("automountServiceAccountToken must be false (the proxy never calls the API)")
    for v in spec.get("volumes", []):
        if "hostPath" in v:
            bad(f"volume {v.get('name')}: hostPath (nothing is pinned in bpffs; none is needed)")
    if (pod_sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        bad("pod seccompProfile must be RuntimeDefault")
    if not spec.get("tolerations"):
        bad("no tolerations")

    ann = meta.get("annotations") or {}
    if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/path") != "/metrics":
        bad("pod template lacks prometheus.io/scrape=true and prometheus.io/path=/metrics")
    if ann.get("prometheus.io/port") != str(METRICS_PORT):
        bad(f"prometheus.io/port must be {METRICS_PORT}")

    containers = spec.get("containers", []) + spec.get("initContainers", [])
    for c in containers:
        cw = f"container {c.get('name')}"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            bad(f"{cw}: privileged (use the capability set in overlays/sockmap instead)")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad(f"{cw}: allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad(f"{cw}: readOnlyRootFilesystem must be true")
        caps = sc.get("capabilities") or {}
        if caps.get("drop") != ["ALL"]:
            bad(f"{cw}: capabilities.drop must be [ALL], is {caps.get('drop')}")
        added = {a.upper().removeprefix("CAP_") for a in caps.get("add") or []}
        args = c.get("args", []) + c.get("command", [])
        sockmap = "--mode=sockmap" in args or any(
            a == "--mode" and b == "sockmap" for a, b in zip(args, args[1:])
        )
        if added - ALLOWED_CAPS:
            bad(f"{cw}: capabilities beyond {sorted(ALLOWED_CAPS)}: {sorted(added - ALLOWED_CAPS)}")
        if added and not sockmap:
            bad(f"{cw}: adds {sorted(added)} but does not run --mode=sockmap")
        if sockmap and added != ALLOWED_CAPS:
            bad(f"{cw}: --mode=sockmap needs exactly {sorted(ALLOWED_CAPS)}, has {sorted(added)}")
        run_as_non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if not added and (run_as_non_root is not True or not uid):
            bad(f"{cw}: adds no capability, so it must run as non-root (runAsNonRoot, uid != 0)")

        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(kind) or {}):
                    bad(f"{cw}: resources.{kind}.{r} missing")

        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = (c.get(probe) or {}).get("httpGet") or {}
            if get.get("path") != path or port_number(c, get.get("port")) != METRICS_PORT:
                bad(f"{cw}: {probe} must GET {path} on port {METRICS_PORT}")
        if f"--metrics-listen=0.0.0.0:{METRICS_PORT}" not in args:
            bad(f"{cw}: --metrics-listen=0.0.0.0:{METRICS_PORT} missing (probes and scraping)")
        if "--allow-anonymous" in args:
            bad(f"{cw}: --allow-anonymous makes an open proxy")
        if not any(a.startswith(("--htpasswd", "--credentials")) for a in args):
            bad(f"{cw}: no --htpasswd, --credentials-file or --credentials")
        secret_volumes = {v.get("name") for v in spec.get("volumes", []) if "secret" in v}
        for m in c.get("volumeMounts", []):
            if m.get("name") in secret_volumes and ("subPath" in m or "subPathExpr" in m):
                bad(f"{cw}: Secret volume {m.get('name')} mounted with subPath (never updated)")


def lint(docs, problems):
    by_kind = {}
    for path, doc in docs:
        by_kind.setdefault(doc.get("kind"), []).append((path, doc))
    for kind in ("Namespace", "Secret", "DaemonSet", "Service"):
        if kind not in by_kind:
            problems.append(f"no {kind}")

    for kind, items in by_kind.items():
        for path, doc in items:
            where = f"{path}: {name_of(doc)}"
            if kind in ("Deployment", "StatefulSet", "Job", "Pod"):
                problems.append(f"{where}: unexpected workload kind")
            if kind == "Secret":
                data = {**(doc.get("data") or {}), **(doc.get("stringData") or {})}
                if "htpasswd" not in data:
                    problems.append(f"{where}: no htpasswd key")
            if kind != "DaemonSet":
                continue
            spec = doc["spec"]
            upd = spec.get("updateStrategy") or {}
            if upd.get("type") != "RollingUpdate" or "maxUnavailable" not in (
                upd.get("rollingUpdate") or {}
            ):
                problems.append(f"{where}: updateStrategy must be RollingUpdate with maxUnavailable")
            tpl = spec["template"]
            if not tpl["spec"].get("hostNetwork"):
                problems.append(f"{where}: hostNetwork must be true (a node-level proxy)")
            lint_pod(where, tpl.get("metadata") or {}, tpl["spec"], problems)

            labels = (tpl.get("metadata") or {}).get("labels") or {}
            selected = [
                s for _, s in by_kind.get("Service", [])
                if s["spec"].get("selector")
                and all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
            ]
            if not selected:
                problems.append(f"{where}: no Service selects its pods")
    return by_kind


def lint_migrationcontroller(path, problems):
    docs = load([path])
    if len(docs) != 1 or docs[0][1].get("kind") != "MigrationController":
        problems.append(f"{path}: expected one MigrationController")
        return
    doc = docs[0][1]
    if doc.get("apiVersion") != "migration.openshift.io/v1alpha1":
        problems.append(f"{path}: apiVersion must be migration.openshift.io/v1alpha1")
    url = (doc.get("spec") or {}).get("stunnel_tcp_proxy", "")
    if not re.fullmatch(r"http://[^:@/]+:[^@/]+@[A-Za-z0-9.-]+:3128", url):
        problems.append(f"{path}: stunnel_tcp_proxy must be http://USER:PASS@HOST:3128, is {url!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="YAML files ('-' for stdin)")
    ap.add_argument("--kubernetes-version", default="1.32")
    ap.add_argument("--migrationcontroller", metavar="FILE")
    ap.add_argument("--no-completeness", action="store_true",
                    help="files checked one by one: do not require every kind to be present")
    opts = ap.parse_args()

    docs = load(opts.files)
    problems = []
    validate_schemas(docs, opts.kubernetes_version, problems)
    lint(docs, problems)
    if opts.no_completeness:
        problems = [p for p in problems if not re.fullmatch(r"no \w+", p)
                    and "no Service selects" not in p]
    if opts.migrationcontroller:
        lint_migrationcontroller(opts.migrationcontroller, problems)
    for p in problems:
        print(f"lint: {p}")
    if problems:
        print(f"lint: {len(problems)} problem(s)")
        return 1
    kinds = ", ".join(sorted(d.get("kind") for _, d in docs))
    print(f"lint: ok: {len(docs)} objects valid for Kubernetes {opts.kubernetes_version} "
          f"and locked down ({kinds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
