#!/usr/bin/env python3
"""Renders the ensemble Helm chart offline, like `helm template`, without a helm binary.

It uses helm-python-sdk (PyPI), which bundles Helm's own Go SDK as a native library, so the output
is what `helm template` / `helm install` produce. deploy/check.sh installs it into a venv:

    target/deploy-check-venv/bin/python deploy/tools/render.py -f deploy/examples/three-models.yaml \
        --namespace ensemble > manifests.yaml
    kubectl apply -n ensemble -f manifests.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent.parent / "helm" / "ensemble"


def load_values(files: list[Path]) -> dict[str, Any]:
    """Merges values files left to right (later files win, maps merged deeply), as helm -f does."""

    def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for k, v in over.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = merge(out[k], v)
            else:
                out[k] = v
        return out

    values: dict[str, Any] = {}
    for f in files:
        data = yaml.safe_load(f.read_text()) or {}
        if not isinstance(data, dict):
            raise SystemExit(f"{f}: a values file must be a mapping")
        values = merge(values, data)
    return values


def render(values: dict[str, Any], *, release: str = "ensemble", namespace: str = "ensemble",
           chart: Path = CHART) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included). Raises helm_python errors on failure."""
    import helm_python as helm

    with helm.Chart.load(str(chart)) as c:
        # Helm checks the values against values.schema.json here, as `helm install` does.
        return c.render(values, name=release, namespace=namespace, is_install=True)


def manifests(rendered: dict[str, str]) -> str:
    """The Kubernetes objects of a render as one YAML stream, in template order, NOTES left out."""
    parts = []
    for path in sorted(rendered):
        if not path.endswith((".yaml", ".yml")):
            continue
        text = rendered[path].strip()
        if not text:
            continue
        parts.append(f"---\n# Source: {path}\n{text}\n")
    return "".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-f", "--values", action="append", type=Path, default=[], help="values file (repeatable)")
    ap.add_argument("--release", default="ensemble", help="release name (object name prefix)")
    ap.add_argument("-n", "--namespace", default="ensemble")
    ap.add_argument("--notes", action="store_true", help="print the chart's NOTES to stderr")
    args = ap.parse_args()
    rendered = render(load_values(args.values), release=args.release, namespace=args.namespace)
    sys.stdout.write(manifests(rendered))
    if args.notes:
        for path, text in rendered.items():
            if path.endswith("NOTES.txt"):
                sys.stderr.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
