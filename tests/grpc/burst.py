"""A burst of oversized prompts against `ensemble up` (see burst.sh): every one must be refused with
400 before any node tokenizes it; prints RSS before and peak RSS (VmHWM) of the coordinator process and
of each node, and the latency of a normal request sent in the middle of the burst."""
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

base, coordinator_pid, burst = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
nodes = [int(p) for p in subprocess.run(["pgrep", "-P", str(coordinator_pid)], capture_output=True,
                                         text=True).stdout.split()]


def status_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def post(body, timeout=120):
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


normal = {"model": "ensemble", "messages": [{"role": "user", "content": "What is 12 + 30?"}], "max_tokens": 40}
assert post(normal)[0] == 200
before = {pid: (status_kb(pid, "VmRSS"), status_kb(pid, "VmHWM")) for pid in [coordinator_pid] + nodes}
big = {"model": "ensemble", "messages": [{"role": "user", "content": "x" * 3_000_000}], "max_tokens": 40}
codes = []
lock = threading.Lock()


def send_big():
    code, _ = post(big)
    with lock:
        codes.append(code)


threads = [threading.Thread(target=send_big) for _ in range(burst)]
t0 = time.time()
for t in threads:
    t.start()
time.sleep(0.05)
n0 = time.time()
code, _ = post(normal)
normal_s = time.time() - n0
for t in threads:
    t.join()
burst_s = time.time() - t0
assert code == 200, code
assert codes == [400] * burst, sorted(set(codes))
print(f"burst of {burst} chat requests with a 3 MB prompt (refused: max_message_bytes), "
      f"{burst_s:.2f} s in all; a normal request during the burst: {normal_s * 1e3:.0f} ms")
print()
print("| process | RSS before (MB) | peak before (MB) | peak after the burst (MB) |")
print("|---|---:|---:|---:|")
for name, pid in [("coordinator (ensemble up)", coordinator_pid)] + [(f"node pid {p}", p) for p in nodes]:
    rss, hwm = before[pid]
    print(f"| {name} | {rss / 1024:.0f} | {hwm / 1024:.0f} | {status_kb(pid, 'VmHWM') / 1024:.0f} |")
