"""`deploy/check.sh --images MODEL_NODE_IMAGE,COORDINATOR_IMAGE`: the images built here (docker image
inspect, and the image's own binary asked for its health defaults) against what the Helm chart runs
(bundled-cpu.yaml rendered): entrypoint and arguments, user, ports, the listen port in the image's
environment, and the health service the readiness probe asks for."""

from __future__ import annotations

import json
import subprocess
from typing import Any


def inspect(image: str) -> dict[str, Any] | None:
    p = subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True)
    return json.loads(p.stdout)[0]["Config"] if p.returncode == 0 else None


def health_default(image: str, binary: str) -> str:
    """The `--service` default of `BINARY health`, as the binary in the image prints it."""
    p = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", binary, image,
                        "health", "--help"], capture_output=True, text=True, timeout=60)
    for line in p.stdout.splitlines():
        if "[default: " in line and "ensemble.v1." in line:
            return line.split("[default: ", 1)[1].rstrip("]").strip()
    return ""


def check_images(r: Any, images: list[str], docs: list[dict[str, Any]]) -> None:
    """`docs`: the chart's objects rendered with bundled-cpu.yaml (CPU images)."""
    r.begin("images built here against the Helm chart (bundled-cpu.yaml)")
    pods = {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in docs
            if o["kind"] in ("Deployment", "StatefulSet")}
    for image, binary in zip(images, ["model-node", "coordinator"]):
        conf = inspect(image)
        if not r.check(f"{image}: present (docker image inspect)", conf is not None):
            continue
        containers = [(pod, c) for pod in pods.values() for c in pod["containers"] if c["name"] == binary]
        if not r.check(f"{image}: the chart runs {len(containers)} `{binary}` containers", bool(containers)):
            continue
        pod, c = containers[0]
        repo = c["image"].rsplit(":", 1)[0].rsplit("/", 1)[-1]
        r.check(f"{image}: the chart's image is the same program ({c['image']})",
                repo == image.rsplit(":", 1)[0].removeprefix("ensemble-"), repo)
        r.check(f"{image}: entrypoint {conf['Entrypoint']} + the chart's args {c.get('args')} (no command override)",
                conf["Entrypoint"] == [binary] and "command" not in c and c.get("args") == conf["Cmd"] == ["serve"],
                f"image {conf['Entrypoint']} {conf['Cmd']}, chart {c.get('command')} {c.get('args')}")
        uid = str(conf.get("User", "")).split(":")[0]
        want_uid = str(pod.get("securityContext", {}).get("runAsUser", c.get("securityContext", {}).get("runAsUser")))
        r.check(f"{image}: user {conf.get('User')} = the chart's runAsUser {want_uid}", uid == want_uid != "0")
        exposed = {int(p.split("/")[0]) for p in (conf.get("ExposedPorts") or {})}
        ports = {p["containerPort"] for p in c.get("ports", [])}
        r.check(f"{image}: EXPOSE {sorted(exposed)} = the chart's container ports {sorted(ports)}",
                exposed == ports, f"{exposed} vs {ports}")
        env = dict(e.split("=", 1) for e in conf.get("Env") or [])
        chart_env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if binary == "model-node":
            listen = chart_env.get("MODEL_NODE_LISTEN", env.get("MODEL_NODE_LISTEN", ""))
            r.check(f"{image}: the node listens where the chart's probes and Service point (:{listen.rsplit(':', 1)[-1]})",
                    listen.endswith(":50051") and env.get("MODEL_NODE_LISTEN", "").endswith(":50051"),
                    f"{env.get('MODEL_NODE_LISTEN')} / {listen}")
            r.check(f"{image}: models mounted at the image's MODEL_NODE_MODEL_DIR ({env.get('MODEL_NODE_MODEL_DIR')})",
                    env.get("MODEL_NODE_MODEL_DIR") == chart_env.get("MODEL_NODE_MODEL_DIR") == "/models"
                    and any(m["mountPath"] == "/models" and m.get("readOnly") for m in c.get("volumeMounts", [])))
        hc = (conf.get("Healthcheck") or {}).get("Test") or []
        r.check(f"{image}: HEALTHCHECK {hc}", hc == ["CMD", binary, "health"], str(hc))
        probe = c.get("readinessProbe", {}).get("grpc", {})
        default = health_default(image, binary)
        r.check(f"{image}: `{binary} health` asks for {default!r}, as the chart's readiness probe "
                f"({probe.get('service')!r} on :{probe.get('port')})",
                bool(default) and default == probe.get("service")
                and probe.get("port") in {p["containerPort"] for p in c.get("ports", []) if p.get("name") == "grpc"},
                f"{default!r} vs {probe}")
