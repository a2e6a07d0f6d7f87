"""Re-vendor the KServe CRD schemas that tests/deploy validates against.

    python tests/deploy/vendor_kserve_schemas.py KSERVE_CHECKOUT COMMIT

reads ``config/crd/full/serving.kserve.io_{servingruntimes,inferenceservices}.yaml`` from a
checkout of github.com/kserve/kserve, keeps each CRD's served ``openAPIV3Schema`` (the only part
a manifest is checked against), drops the ``description`` texts (nine tenths of the size, no
effect on validation) and writes ``schemas/kserve/<kind>-<version>.json`` with the source noted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

CRDS = ("serving.kserve.io_servingruntimes.yaml", "serving.kserve.io_inferenceservices.yaml")
OUT = Path(__file__).parent / "schemas" / "kserve"


def without_descriptions(node: object) -> object:
    """``node`` with every schema's ``description`` removed (property names kept)."""
    if isinstance(node, dict):
        return {
            key: without_descriptions(value)
            for key, value in node.items()
            if not (key == "description" and isinstance(value, str))
        }
    if isinstance(node, list):
        return [without_descriptions(item) for item in node]
    return node


def main(checkout: str, commit: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for filename in CRDS:
        crd = yaml.safe_load((Path(checkout) / "config/crd/full" / filename).read_text())
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served", True):
                continue
            schema = without_descriptions(version["schema"]["openAPIV3Schema"])
            schema["$comment"] = (
                f"openAPIV3Schema of {kind} {crd['spec']['group']}/{version['name']} from "
                f"github.com/kserve/kserve config/crd/full/{filename} at commit {commit}; "
                "descriptions removed"
            )
            path = OUT / f"{kind.lower()}-{version['name']}.json"
            path.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
            print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
