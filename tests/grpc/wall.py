"""NextCharDistribution and ProposeSegment from Python grpcio, an external client: wall time seen by
the client against the node's own compute time, per call (median). Before TCP_NODELAY a ~500-byte
answer waited ~40 ms for Nagle's algorithm to meet the client's delayed ACK; now wall ~ compute plus
the loopback round trip. With a fourth argument (e.g. `1,4,16`), also concurrent greedy ProposeSegment
calls of 100 tokens, each on its own channel: aggregate tokens/s and per-stream ms per token (the
node's batching seen from outside). Prints tables; asserts only that every call succeeded."""
import os
import statistics
import sys
import threading
import time

import grpc

sys.path.insert(0, os.environ["STUBS"])
from ensemble.v1 import node_pb2 as pb  # noqa: E402
from ensemble.v1 import node_pb2_grpc as rpc  # noqa: E402

addr, model, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
streams = [int(n) for n in sys.argv[4].split(",")] if len(sys.argv) > 4 and sys.argv[4] else []
stub = rpc.ModelNodeStub(grpc.insecure_channel(addr))
text = "Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog."


def context(session, i):
    if i == 0:
        return pb.Context(session_id=session, full=pb.FullContext(prompt=pb.Prompt(raw=""), answer=""))
    return pb.Context(session_id=session, delta=pb.ContextDelta(base_chars=i - 1, append=text[i - 1]))


print(f"external client (Python grpcio {grpc.__version__}), {model}, {calls} calls each, medians")
print()
print("| call | answer bytes | wall ms (client) | node compute ms | wall - compute ms |")
print("|---|---:|---:|---:|---:|")
for top_k in (8, 32, 256):
    wall, compute, size = [], [], 0
    for i in range(calls):
        t0 = time.perf_counter()
        r = stub.NextCharDistribution(pb.NextCharRequest(context=context(f"py-{top_k}", i % len(text)), top_k=top_k))
        wall.append((time.perf_counter() - t0) * 1e3)
        compute.append(r.usage.compute_ms)
        size = r.ByteSize()
    w, c = statistics.median(wall), statistics.median(compute)
    print(f"| NextCharDistribution top_k {top_k} | {size} | {w:.2f} | {c:.2f} | {w - c:.2f} |")
wall, compute = [], []
for i in range(calls):
    t0 = time.perf_counter()
    r = stub.ProposeSegment(pb.ProposeRequest(context=context("", 0), max_new_tokens=16, sampling=pb.Sampling()))
    wall.append((time.perf_counter() - t0) * 1e3)
    compute.append(r.usage.compute_ms)
w, c = statistics.median(wall), statistics.median(compute)
print(f"| ProposeSegment 16 tokens | {r.ByteSize()} | {w:.2f} | {c:.2f} | {w - c:.2f} |")


def streams_round(n, tokens=100):
    """n concurrent greedy proposals of `tokens` tokens, each on its own channel (opened first):
    (aggregate tokens/s, mean per-stream ms per token)."""
    stubs = [rpc.ModelNodeStub(grpc.insecure_channel(addr)) for _ in range(n)]
    for s in stubs:
        s.Info(pb.InfoRequest())
    out = [None] * n

    def one(i):
        req = pb.ProposeRequest(context=pb.Context(full=pb.FullContext(prompt=pb.Prompt(raw=f"Story {i}: the cat"),
                                                                       answer="")),
                                max_new_tokens=tokens, sampling=pb.Sampling())
        t = time.perf_counter()
        r = stubs[i].ProposeSegment(req)
        k = max(len(r.token_logprobs), 1)
        out[i] = (k, (time.perf_counter() - t) * 1e3 / k)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return sum(k for k, _ in out) / wall, statistics.mean(ms for _, ms in out)


if streams:
    print()
    print(f"concurrent greedy ProposeSegment calls of 100 tokens, {model}, each on its own channel, "
          "median of 3 rounds after a warm-up round")
    print()
    print("| streams | aggregate tokens/s | per-stream ms/token | x single-stream aggregate |")
    print("|---:|---:|---:|---:|")
    streams_round(max(streams))
    single = None
    for n in streams:
        runs = sorted((streams_round(n) for _ in range(3)), key=lambda r: r[0])
        agg, ms = runs[1]
        single = single or agg
        print(f"| {n} | {agg:.0f} | {ms:.2f} | {agg / single:.2f} |")
