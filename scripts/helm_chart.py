#!/usr/bin/env python3
"""Lint and render a Helm chart offline with helm-sdkpy (Helm's own Go library), for tests/deploy.rs.

    helm_chart.py lint CHART
        Lints CHART with its own values, then a copy of it per example values file in CHART/ci/
        (Helm's Lint action only takes the chart's values.yaml, so each copy gets the chart's
        values with the example merged over them, the way Helm merges -f files). Exits 1 if any
        lint reports a warning or an error.

    helm_chart.py render CHART [VALUES_FILE]
        Renders CHART (with VALUES_FILE merged over its values) and prints the manifests as one
        JSON array of objects. helm-sdkpy has no `helm template`, so this runs a real Install
        against a stand-in Kubernetes API on 127.0.0.1 that only answers discovery and accepts
        every object; what Helm sends it is the rendered chart, validated against
        values.schema.json on the way.

Needs: pip install --ignore-requires-python helm-sdkpy pyyaml (bash .ci/run installs them).
"""

import asyncio
import copy
import json
import shutil
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

try:
    import helm_sdkpy
    import yaml
except ImportError as err:  # a missing tool is a failure, never a skip
    sys.exit(
        f"error: {err}. Install with: python3 -m pip install --ignore-requires-python "
        "helm-sdkpy kubernetes-validate (bash .ci/run does)"
    )

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def merge(base, override):
    """Helm's values coalescing: maps merge recursively, null deletes, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def lint_one(path, label):
    result = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(str(path)))
    messages = result.get("Messages") or []
    errors = result.get("Errors") or []
    bad = [m for m in messages if m.get("Severity", 0) >= 2]
    for m in messages:
        # Helm's error texts do not survive helm-sdkpy's JSON encoding; path and severity do.
        print(f"  {label}: {SEVERITY.get(m.get('Severity'), '?')} {m.get('Path')} {m.get('Err') or ''}")
    ok = not bad and not errors
    print(f"{'ok  ' if ok else 'FAIL'} helm lint {label} ({len(messages)} messages)")
    return ok


def lint(chart):
    chart = Path(chart).resolve()
    ok = lint_one(chart, "values.yaml")
    examples = sorted((chart / "ci").glob("*.yaml"))
    if not examples:
        print(f"FAIL no example values files in {chart / 'ci'}")
        ok = False
    base = yaml.safe_load((chart / "values.yaml").read_text()) or {}
    for example in examples:
        with tempfile.TemporaryDirectory(prefix="helm-lint-") as tmp:
            copy_dir = Path(tmp) / chart.name
            shutil.copytree(chart, copy_dir)
            merged = merge(base, yaml.safe_load(example.read_text()) or {})
            (copy_dir / "values.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
            ok = lint_one(copy_dir, f"ci/{example.name}") and ok
    return 0 if ok else 1


class FakeKubeApi(BaseHTTPRequestHandler):
    """Just enough of a Kubernetes API for `helm install`: discovery, nothing exists yet,
    every create succeeds. Helm's release record arrives as protobuf and is acknowledged blindly."""

    RESOURCES = {
        "v1": [("configmaps", "ConfigMap"), ("services", "Service"), ("secrets", "Secret"),
               ("serviceaccounts", "ServiceAccount"), ("pods", "Pod")],
        "apps/v1": [("deployments", "Deployment"), ("statefulsets", "StatefulSet")],
        "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
        "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor"),
                                     ("prometheusrules", "PrometheusRule")],
    }

    def log_message(self, *args):
        pass

    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/version":
            return self.reply(200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0",
                                    "platform": "linux/amd64"})
        if path == "/api":
            return self.reply(200, {"kind": "APIVersions", "versions": ["v1"],
                                    "serverAddressByClientCIDRs": []})
        if path == "/apis":
            groups = {}
            for gv in self.RESOURCES:
                if "/" in gv:
                    group, version = gv.split("/")
                    groups.setdefault(group, []).append({"groupVersion": gv, "version": version})
            return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": vs, "preferredVersion": vs[0]} for g, vs in groups.items()]})
        for gv, resources in self.RESOURCES.items():
            if path == ("/api/v1" if gv == "v1" else f"/apis/{gv}"):
                return self.reply(200, {
                    "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                    "resources": [{"name": name, "singularName": kind.lower(), "namespaced": True,
                                   "kind": kind, "verbs": ["create", "delete", "get", "list",
                                                           "patch", "update", "watch"]}
                                  for name, kind in resources]})
        if path.endswith("/secrets"):  # Helm's release history: none
            return self.reply(200, {"kind": "SecretList", "apiVersion": "v1", "metadata": {},
                                    "items": []})
        return self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "reason": "NotFound", "code": 404, "message": "not found"})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if "json" in (self.headers.get("Content-Type") or ""):
            obj = json.loads(raw)
        else:
            obj = {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "release"}}
        obj.setdefault("metadata", {}).update({"uid": "0", "resourceVersion": "1"})
        return self.reply(201, obj)

    do_PUT = do_POST
    do_PATCH = do_POST


def render(chart, values_file=None):
    values = yaml.safe_load(Path(values_file).read_text()) if values_file else None
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKubeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "fake", "user": {"token": "fake"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                  "namespace": "default"}}],
    })
    try:
        config = helm_sdkpy.Configuration(namespace="default", kubeconfig=kubeconfig)
        release = asyncio.run(helm_sdkpy.Install(config).run(
            "outbox-relay", str(Path(chart).resolve()), values=values, wait=False, timeout=60))
    except helm_sdkpy.HelmError as err:
        print(f"error: rendering {chart} with {values_file or 'its values'}: {err}", file=sys.stderr)
        return 1
    finally:
        server.shutdown()
    docs = [d for d in yaml.safe_load_all(release.get("manifest", "")) if d]
    print(json.dumps(docs, indent=1))
    return 0


def main(argv):
    if len(argv) >= 2 and argv[0] == "lint" and len(argv) == 2:
        return lint(argv[1])
    if len(argv) in (2, 3) and argv[0] == "render":
        return render(*argv[1:])
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
