"""KubeRay's CRDs as strict JSON Schemas, for validating tlray's manifests offline.

A CRD's `openAPIV3Schema` is almost a JSON Schema; what it lacks is that the API server (with
`kubectl apply --validate=strict`) rejects fields the schema does not list. Here every object
that lists its properties, and does not say `x-kubernetes-preserve-unknown-fields`, gets
`additionalProperties: false`, so a misspelt field fails validation as it would fail to apply.
`nullable` becomes a "null" type.

Run it once per KubeRay release that k8s/ is pinned to (see README.md beside it):

    git clone --depth 1 --branch v1.7.0 https://github.com/ray-project/kuberay /tmp/kuberay
    python k8s/schemas/convert_crds.py /tmp/kuberay v1.7.0
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import yaml

CRDS = ("rayclusters", "rayjobs")
VERSION = "v1"  # the API version tlray's manifests use
HERE = Path(__file__).resolve().parent


def strict(schema: Any) -> Any:
    """The same schema, closed to unknown fields wherever Kubernetes closes it."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    open_ended = out.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in out
    if out.get("type") == "object" and "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


def convert(kuberay: Path, tag: str) -> list[Path]:
    written = []
    for name in CRDS:
        crd = yaml.safe_load((kuberay / "ray-operator/config/crd/bases" /
                              f"ray.io_{name}.yaml").read_text())
        for version in crd["spec"]["versions"]:
            if version["name"] != VERSION:
                continue
            schema = strict(version["schema"]["openAPIV3Schema"])
            schema["$comment"] = (f"ray-project/kuberay {tag}, ray-operator/config/crd/bases/"
                                  f"ray.io_{name}.yaml, version {version['name']}; converted "
                                  f"by k8s/schemas/convert_crds.py")
            path = HERE / f"{name}.ray.io.{version['name']}.json.gz"
            text = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
            with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
                f.write(text)  # mtime 0: the same CRD always gives the same bytes
            written.append(path)
    return written


if __name__ == "__main__":
    for p in convert(Path(sys.argv[1]), sys.argv[2]):
        print(f"wrote {p} ({p.stat().st_size:,} bytes)")
