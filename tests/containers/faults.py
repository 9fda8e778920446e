"""Faults across hosts on the compose cluster (run by tests/containers/run.sh, which builds the images,
brings the cluster up and tears it down). Every node is its own container with its own address on the
project's private bridge network; faults are Docker's own: kill, pause, network disconnect, restart,
a crash of the coordinator's process. Clients are external: grpcio (the load), the `openai` package
(the HTTP API) and the `ensemble` CLI on the host.

Environment: PROJECT (compose project), COMPOSE (the compose command, space-separated), COMPOSE_FILES
(colon-separated), GRPC_PORT, HTTP_PORT, DEADLINE_MS (the coordinator's node deadline), STUBS.
Prints a table per scenario; exits 1 on the first broken promise, with what was seen.
"""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.environ["STUBS"])
import grpc  # noqa: E402
from ensemble.v1 import ensemble_pb2 as pb  # noqa: E402
from ensemble.v1 import ensemble_pb2_grpc as pbg  # noqa: E402
from ensemble.v1 import node_pb2 as npb  # noqa: E402

PROJECT = os.environ["PROJECT"]
COMPOSE = os.environ["COMPOSE"].split() + sum((["-f", f] for f in os.environ["COMPOSE_FILES"].split(":")), [])
GRPC = f"127.0.0.1:{os.environ['GRPC_PORT']}"
HTTP = f"http://127.0.0.1:{os.environ['HTTP_PORT']}"
DEADLINE = int(os.environ["DEADLINE_MS"]) / 1000
NETWORK = f"{PROJECT}_ensemble"
CONCURRENCY = 4
T0 = time.monotonic()

PROMPTS = [json.loads(line)["messages"] for line in open("eval/mixed.jsonl")][:24]


def log(msg):
    print(f"  [{time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def fail(msg):
    print(f"FAILED: {msg}", flush=True)
    raise SystemExit(1)


def sh(*args, check=True):
    p = subprocess.run(args, capture_output=True, text=True)
    if check and p.returncode != 0:
        fail(f"{' '.join(args)}: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout.strip()


def containers(service):
    """The containers of a compose service, oldest first."""
    out = sh("docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
             "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}")
    return sorted(out.split())


def health(name):
    return sh("docker", "inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
              name, check=False)


def ip_of(name):
    return sh("docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
              name).split()[0]


def wait(what, cond, timeout=90, every=0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return time.monotonic()
        time.sleep(every)
    fail(f"timed out after {timeout} s waiting for {what}")


def members():
    """The coordinator's view of its members: name -> (up, why not)."""
    try:
        with urllib.request.urlopen(f"{HTTP}/ui/api/members", timeout=2) as r:
            return {m["name"]: (m["up"], m["error"]) for m in json.load(r)["members"]}
    except OSError:
        return {}


def member_up(name):
    return members().get(name, (False, ""))[0]


def metric_sum(url, name):
    with urllib.request.urlopen(url, timeout=3) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def channel():
    # Reconnect quickly once the coordinator is back (gRPC's default backoff reaches minutes).
    return grpc.insecure_channel(GRPC, options=[
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 500)])


def request(i):
    msgs = [npb.ChatMessage(role=m["role"], content=m["content"]) for m in PROMPTS[i % len(PROMPTS)]]
    return pb.GenerateRequest(prompt=npb.Prompt(conversation=npb.Conversation(messages=msgs)), max_chars=48)


class Load:
    """CONCURRENCY client threads calling Generate back to back, until `total` requests or stop().
    Records (start, end, status code) per request."""

    def __init__(self, total=None, pause_on_error=0.05):
        self.total, self.pause = total, pause_on_error
        self.results, self.lock, self.stopping = [], threading.Lock(), threading.Event()
        self.next = 0
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(CONCURRENCY)]
        for t in self.threads:
            t.start()

    def take(self):
        with self.lock:
            if self.stopping.is_set() or (self.total is not None and self.next >= self.total):
                return None
            self.next += 1
            return self.next - 1

    def run(self):
        ch = channel()
        stub = pbg.EnsembleStub(ch)
        while (i := self.take()) is not None:
            start = time.monotonic()
            try:
                r = stub.Generate(request(i), timeout=60)
                # An answer may be all reasoning (a <think> block cut by max_chars): still an answer.
                code, detail = ("OK" if r.text or r.reasoning else "EMPTY"), ""
            except grpc.RpcError as e:
                code, detail = e.code().name, e.details()
            end = time.monotonic()
            with self.lock:
                self.results.append((start, end, code, detail))
            if code == "UNAVAILABLE":
                # A fresh connection: a reconnect attempt that Docker's port proxy swallowed while the
                # coordinator restarted leaves a channel failing fast for seconds after it is back.
                ch.close()
                ch = channel()
                stub = pbg.EnsembleStub(ch)
            if code != "OK":
                time.sleep(self.pause)

    def done(self):
        with self.lock:
            return len(self.results)

    def wait_done(self, n, timeout=120):
        wait(f"{n} finished requests", lambda: self.done() >= n, timeout)

    def stop(self, timeout=120):
        self.stopping.set()
        for t in self.threads:
            t.join(timeout)
        return self.results


ROWS = []


def summary(name, results, extra=""):
    lat = sorted(e - s for s, e, _, _ in results)
    failed = [r for r in results if r[2] != "OK"]
    p50 = lat[len(lat) // 2] if lat else 0
    ROWS.append(f"| {name} | {len(results)} | {len(failed)} | {p50 * 1000:.0f} | "
                f"{lat[-1] * 1000 if lat else 0:.0f} | {extra} |")
    log(ROWS[-1])
    return failed


def table():
    print("\n| scenario | requests | failed | p50 ms | max ms | notes |\n|---|---:|---:|---:|---:|---|")
    print("\n".join(ROWS), flush=True)


# ---------------------------------------------------------------------------------------------------


def scenario_clients():
    """External clients against the containers: the ensemble CLI, grpcio's ListNodes, openai."""
    out = sh("./target/release/ensemble", "generate", "--coordinator", f"http://{GRPC}", "Compute 12 + 30.")
    if not out:
        fail("ensemble generate printed nothing")
    log(f"ensemble generate: {out!r}")
    nodes = pbg.EnsembleStub(channel()).ListNodes(pb.ListNodesRequest(), timeout=10).nodes
    if not (len(nodes) == 3 and all(n.healthy for n in nodes)):
        fail(f"ListNodes: {nodes}")
    from openai import OpenAI

    client = OpenAI(base_url=f"{HTTP}/v1", api_key="unused")
    r = client.chat.completions.create(model="specfuse", max_tokens=24,
                                       messages=[{"role": "user", "content": "Compute 7 + 5."}])
    text = r.choices[0].message.content
    if not text:
        fail(f"openai: empty answer {r}")
    log(f"openai chat.completions (specfuse): {text!r}")


def scenario_kill(service="node-atlas"):
    """docker kill (SIGKILL) of a node while 50 requests run: none may fail."""
    (name,) = containers(service)
    load = Load(total=50)
    load.wait_done(6)
    sh("docker", "kill", name)
    log(f"docker kill {name}")
    load.wait_done(50)
    failed = summary("`docker kill` of a node mid-request", load.stop(), f"{service} killed after 6 answers")
    if failed:
        fail(f"{len(failed)} requests failed: {failed[:3]}")
    sh("docker", "start", name)
    wait(f"{name} healthy", lambda: health(name) == "healthy")
    wait(f"{service} readmitted", lambda: member_up(service.removeprefix("node-")))
    log(f"{name} restarted, healthy and readmitted")


def hang(service, inject, heal, label):
    """A node that stops answering without closing its connections (pause, partition): requests pay
    at most one deadline, the node is ejected, and readmitted once it answers again."""
    (name,) = containers(service)
    member = service.removeprefix("node-")
    load = Load()
    load.wait_done(4)
    t_fault = time.monotonic()
    inject(name)
    log(f"{label} {name}")
    t_eject = wait(f"{member} ejected", lambda: not member_up(member), timeout=4 * DEADLINE + 10)
    log(f"{member} ejected after {t_eject - t_fault:.1f} s: {members().get(member)}")
    # Requests go on without it; then it comes back.
    n = load.done()
    load.wait_done(n + 8)
    heal(name)
    t_heal = time.monotonic()
    log(f"healed {name}")
    t_back = wait(f"{member} readmitted", lambda: member_up(member), timeout=60)
    log(f"{member} readmitted after {t_back - t_heal:.1f} s")
    n = load.done()
    load.wait_done(n + 4)
    results = load.stop()
    slow = [r for r in results if r[1] - r[0] >= DEADLINE]
    failed = summary(label, results, f"ejected {t_eject - t_fault:.1f} s after the fault, readmitted "
                                     f"{t_back - t_heal:.1f} s after healing; {len(slow)} paid a deadline")
    if failed:
        fail(f"{len(failed)} requests failed: {failed[:3]}")
    worst = max(e - s for s, e, _, _ in results)
    if worst >= 2 * DEADLINE:
        fail(f"a request took {worst:.1f} s: it paid more than one {DEADLINE:.0f} s deadline")
    # Only requests that reached the node before it was ejected pay: those in flight at the fault and
    # those their clients sent next, before the first deadline ran out.
    if len(slow) > 2 * CONCURRENCY:
        fail(f"{len(slow)} requests paid a deadline; only those sent before the ejection may")


def scenario_pause():
    hang("node-general", lambda n: sh("docker", "pause", n), lambda n: sh("docker", "unpause", n),
         "`docker pause` of a node")


def scenario_partition():
    def cut(n):
        sh("docker", "network", "disconnect", NETWORK, n)

    def join(n):
        sh("docker", "network", "connect", "--alias", "node-atlas", NETWORK, n)

    hang("node-atlas", cut, join, "`docker network disconnect` of a node")


def scenario_rolling_restart():
    """Every node restarted in turn (SIGTERM, drain, start, healthy, readmitted) under steady load."""
    load = Load()
    load.wait_done(4)
    for service in ("node-arith", "node-atlas", "node-general"):
        (name,) = containers(service)
        t = time.monotonic()
        sh("docker", "restart", "-t", "40", name)
        wait(f"{name} healthy", lambda: health(name) == "healthy")
        wait(f"{service} readmitted", lambda: member_up(service.removeprefix("node-")))
        log(f"{name} restarted and readmitted in {time.monotonic() - t:.1f} s")
        n = load.done()
        load.wait_done(n + 4)
    failed = summary("rolling restart of every node", load.stop(), "one node at a time, SIGTERM then start")
    if failed:
        fail(f"{len(failed)} requests failed: {failed[:3]}")


def scenario_replicas():
    """A second arith replica behind the service's DNS name: requests spread, and killing one of the
    two fails nothing."""
    sh(*COMPOSE, "up", "-d", "--wait", "--no-recreate", "--scale", "node-arith=2", "node-arith")
    names = containers("node-arith")
    if len(names) != 2:
        fail(f"expected two node-arith replicas, found {names}")
    urls = {n: f"http://{ip_of(n)}:9090/metrics" for n in names}
    log(f"node-arith replicas: {', '.join(f'{n} ({ip_of(n)})' for n in names)}")

    def served():
        return {n: metric_sum(u, "ensemble_node_requests_total") for n, u in urls.items()}

    # The coordinator re-resolves every dns_refresh_ms (5 s in compose-coordinator.toml): once the new
    # replica serves, it knows both; then 20 requests show how they are spread.
    first = served()
    load = Load()
    wait("the new replica serving", lambda: served()[names[1]] > first[names[1]], timeout=60)
    before, n = served(), load.done()
    load.wait_done(n + 20)
    spread = {k: int(v - before[k]) for k, v in served().items()}
    log(f"node calls per replica over 20 requests: {spread}")
    if min(spread.values()) == 0:
        fail(f"requests not spread over the two replicas: {spread}")
    sh("docker", "kill", names[1])
    log(f"docker kill {names[1]}")
    n = load.done()
    load.wait_done(n + 30)
    failed = summary("two arith replicas, one killed", load.stop(),
                     "node calls per replica over 20 requests before the kill: "
                     + " and ".join(str(v) for v in spread.values()))
    if failed:
        fail(f"{len(failed)} requests failed: {failed[:3]}")
    sh("docker", "rm", "-f", names[1])


def serving():
    """The coordinator's readiness as a client on the host sees it (grpc.health.v1 through the
    published port, asked by the coordinator binary's own probe)."""
    return subprocess.run(["./target/release/coordinator", "health", "--listen", GRPC, "--timeout-ms", "500"],
                          capture_output=True).returncode == 0


def coordinator_down(label, act):
    """The coordinator goes away and comes back by itself: clients see only UNAVAILABLE, only while it
    is down, and the cluster answers again without anyone touching the nodes."""
    (name,) = containers("coordinator")
    load = Load(pause_on_error=0.1)
    load.wait_done(4)
    t_down = time.monotonic()
    act(name)
    log(f"{label} {name}")
    t_up = wait("the coordinator SERVING again (seen from the host)", serving, timeout=90, every=0.05)
    log(f"coordinator serving again after {t_up - t_down:.1f} s")
    wait("8 answers after it came back",
         lambda: sum(1 for r in list(load.results) if r[0] > t_up and r[2] == "OK") >= 8, timeout=60)
    results = load.stop()
    failed = [r for r in results if r[2] != "OK"]
    codes = sorted({r[2] for r in failed})
    summary(label, results, f"failures: {', '.join(codes) or 'none'}, all while it was down "
                            f"({t_up - t_down:.1f} s)")
    wrong = [r for r in failed if r[2] != "UNAVAILABLE"]
    if wrong:
        fail(f"clients saw other codes than UNAVAILABLE: {wrong[:3]}")
    # Slack for the client's own pause after a failure (0.1 s) and its new connection.
    late = [r for r in failed if r[0] > t_up + 0.5]
    if late:
        fail(f"{len(late)} requests sent after the coordinator was back failed: {late[:3]}")


def scenario_coordinator_restart():
    coordinator_down("coordinator restarted (`docker restart`)",
                     lambda n: sh("docker", "restart", "-t", "20", n))


def scenario_coordinator_crash():
    # SIGKILL of the coordinator's process from the host, as a crash: the restart policy brings it back.
    def crash(n):
        restarts = sh("docker", "inspect", "-f", "{{.RestartCount}}", n)
        pid = sh("docker", "inspect", "-f", "{{.State.Pid}}", n)
        os.kill(int(pid), 9)
        wait("the crash noticed", lambda: sh("docker", "inspect", "-f", "{{.State.Running}}", n) == "false"
             or sh("docker", "inspect", "-f", "{{.RestartCount}}", n) != restarts, timeout=20, every=0.05)

    coordinator_down("coordinator crashed (SIGKILL, restart policy)", crash)


SCENARIOS = {
    "clients": scenario_clients,
    "kill": scenario_kill,
    "pause": scenario_pause,
    "partition": scenario_partition,
    "rolling": scenario_rolling_restart,
    "replicas": scenario_replicas,
    "coordinator-restart": scenario_coordinator_restart,
    "coordinator-crash": scenario_coordinator_crash,
}


def main():
    chosen = sys.argv[1:] or list(SCENARIOS)
    try:
        for name in chosen:
            print(f"-- {name}: {SCENARIOS[name].__doc__ or ''}".rstrip(), flush=True)
            start = time.monotonic()
            SCENARIOS[name]()
            log(f"{name}: passed in {time.monotonic() - start:.1f} s")
    finally:
        table()
    print(f"all {len(chosen)} scenarios passed in {time.monotonic() - T0:.0f} s")


if __name__ == "__main__":
    main()
