#!/usr/bin/env python3
"""Validate Kubernetes manifests against a Kubernetes version's schemas, for tests/deploy.rs.

    k8s_validate.py VERSION FILE...

Each FILE is YAML (several documents allowed) or a JSON array of objects (what
`helm_chart.py render` prints). Every object is checked with kubernetes-validate in strict mode
(unknown fields are errors too); kinds it has no schema for (CRDs such as ServiceMonitor) are
reported and fail, so nothing passes unchecked unless listed in --skip-kinds.
Exits 1 if anything is invalid.

Needs: pip install kubernetes-validate (bash .ci/run installs it).
"""

import json
import sys

try:
    import kubernetes_validate
    import yaml
except ImportError as err:  # a missing tool is a failure, never a skip
    sys.exit(
        f"error: {err}. Install with: python3 -m pip install --ignore-requires-python "
        "helm-sdkpy kubernetes-validate (bash .ci/run does)"
    )


def load(path):
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [d for d in yaml.safe_load_all(text) if d]


def main(argv):
    skip = set()
    args = []
    for arg in argv:
        if arg.startswith("--skip-kinds="):
            skip |= set(filter(None, arg.split("=", 1)[1].split(",")))
        else:
            args.append(arg)
    if len(args) < 2:
        sys.exit(__doc__)
    version, files = args[0], args[1:]
    failed = 0
    checked = 0
    for path in files:
        for obj in load(path):
            name = f"{path}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            if obj.get("kind") in skip:
                print(f"skip {name} (no schema for {obj.get('kind')} in kubernetes-validate)")
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                failed += 1
                print(f"FAIL {name}: {'.'.join(str(p) for p in err.path)}: {err.message}")
                continue
            except kubernetes_validate.SchemaNotFoundError as err:
                failed += 1
                print(f"FAIL {name}: no schema ({err})")
                continue
            checked += 1
            print(f"ok   {name} (Kubernetes {version}, strict)")
    if checked == 0:
        print("FAIL nothing was validated")
        failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
