"""NextCharDistribution and ProposeSegment from Python grpcio, an external client: wall time seen by
the client against the node's own compute time, per call (median). Before TCP_NODELAY a ~500-byte
answer waited ~40 ms for Nagle's algorithm to meet the client's delayed ACK; now wall ~ compute plus
the loopback round trip. Prints a table; asserts only that every call succeeded."""
import os
import statistics
import sys
import time

import grpc

sys.path.insert(0, os.environ["STUBS"])
from ensemble.v1 import node_pb2 as pb  # noqa: E402
from ensemble.v1 import node_pb2_grpc as rpc  # noqa: E402

addr, model, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
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
