"""Decode speed of model-node and llama.cpp (llama-cpp-python) on the same GGUF files: batch 1,
greedy from BOS, 2 threads each, medians of interleaved rounds; cores used = CPU time / wall time
during decoding; prefill of ~1,000 characters of real text (the node's time includes its first
token). Run by tests/bench/llamacpp.sh; with BENCH_DEVICE=cuda:0 (and BENCH_BIN, a CUDA build) both
engines run on the GPU: the node on that device, llama.cpp with every layer offloaded."""

import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROUNDS, TOKENS = (int(a) for a in (sys.argv[1:3] if len(sys.argv) > 2 else (5, 200)))
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("BENCH_BIN", ROOT / "target" / "release" / "model-node"))
DEVICE = os.environ.get("BENCH_DEVICE", "cpu")
GPU_LAYERS = 0 if DEVICE == "cpu" else -1
WORK = ROOT / "target" / "llamacpp-bench"
REAL = ROOT.parent / "shared" / "real" / "models" / "stories260K"
TEXT = ROOT.parent / "shared" / "real" / "text" / "tinystories-valid-a.txt"
# The prefill prompt: ~1,000 characters of real text (about 250 tokens with stories260K's tokenizer).
PROMPT = (TEXT.read_text() if TEXT.exists() else "Once upon a time, there was a little girl. " * 40)
PROMPT = " ".join(PROMPT.split())[:1000]
THREADS = 2


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def random_llama(name, hidden, layers, ff, heads):
    """A random Llama with stories260K's tokenizer (512 tokens), written as a HuggingFace directory."""
    d = WORK / name
    if (d / "model.safetensors").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REAL / f, d / f)
    vocab = 512
    cfg = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": ff, "vocab_size": vocab,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
           "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
    (d / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(7)
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)),
         "model.norm.weight": np.ones(hidden), "lm_head.weight": rng.standard_normal((vocab, hidden)) / hidden**0.5}
    for i in range(layers):
        p = f"model.layers.{i}"
        for n, shape in [("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                         ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                         ("mlp.gate_proj", (ff, hidden)), ("mlp.up_proj", (ff, hidden)),
                         ("mlp.down_proj", (hidden, ff))]:
            t[f"{p}.{n}.weight"] = rng.standard_normal(shape) * (0.5 / shape[1] ** 0.5)
        t[f"{p}.input_layernorm.weight"] = np.ones(hidden)
        t[f"{p}.post_attention_layernorm.weight"] = np.ones(hidden)
    write_safetensors(d / "model.safetensors", t)
    return d


def convert(src, ty):
    out = WORK / f"{src.name}-{ty}"
    if not (out / "model.gguf").exists():
        subprocess.run([BIN, "convert", "--model-dir", src, "--out", out, "--type", ty], check=True,
                       capture_output=True)
    return out / "model.gguf"


def ours(gguf):
    """tokens/s while decoding, from the node's own log of its generation (load time excluded), and
    cores used by the whole process (CPU time / wall time, loading included)."""
    t0, c0 = time.monotonic(), os.times()
    p = subprocess.run([BIN, "generate", "--model-dir", gguf, "--raw", "--prompt", "", "--threads",
                        str(THREADS), "--device", DEVICE, "--max-new-tokens", str(TOKENS), "--temperature", "0"],
                       capture_output=True, text=True, check=True, env={**os.environ, "NO_COLOR": "1"})
    m = re.search(r"tokens=(\d+) .*ms=([\d.]+)", p.stderr)
    tokens, ms = int(m.group(1)), float(m.group(2))
    wall, c1 = time.monotonic() - t0, os.times()
    return tokens / (ms / 1000), (c1.children_user - c0.children_user + c1.children_system - c0.children_system) / wall


def ours_prefill(gguf):
    """Milliseconds to read PROMPT and produce one token (the node's own measure)."""
    p = subprocess.run([BIN, "generate", "--model-dir", gguf, "--raw", "--prompt", PROMPT, "--threads",
                        str(THREADS), "--device", DEVICE, "--max-new-tokens", "1", "--temperature", "0"],
                       capture_output=True, text=True, check=True)
    return float(re.search(r"ms=([\d.]+)", p.stderr).group(1))


def llama_cpp_prefill(llm):
    """Milliseconds to evaluate PROMPT's tokens (BOS first), and how many there are."""
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True)
    llm.reset()
    t0 = time.monotonic()
    llm.eval(tokens)
    return (time.monotonic() - t0) * 1000, len(tokens)


def llama_cpp(llm):
    bos = llm.token_bos()
    llm.reset()
    t0, c0 = time.monotonic(), os.times()
    n = 0
    for _ in llm.generate([bos], temp=0.0, top_k=1, reset=True):
        n += 1
        if n >= TOKENS:
            break
    wall = time.monotonic() - t0
    c1 = os.times()
    return n / wall, (c1.user - c0.user + c1.system - c0.system) / wall


def main():
    from llama_cpp import Llama

    models = []
    if REAL.exists():
        models.append(("stories260K (real)", REAL))
    models.append(("random Llama 512 x 8 (~25M)", random_llama("llama-25M", 512, 8, 1408, 8)))
    models.append(("random Llama 1024 x 12 (~150M)", random_llama("llama-150M", 1024, 12, 2816, 16)))
    rows = []
    for label, src in models:
        for ty in ("f32", "q8_0"):
            gguf = convert(src, ty)
            llm = Llama(model_path=str(gguf), n_threads=THREADS, n_threads_batch=THREADS, n_ctx=1024,
                        n_batch=512, n_gpu_layers=GPU_LAYERS, verbose=False, seed=0)
            a, b, cores_a, cores_b, pa, pb = [], [], [], [], [], []
            for _ in range(ROUNDS):
                tps, c = ours(gguf)
                a.append(tps)
                cores_a.append(c)
                tps, c = llama_cpp(llm)
                b.append(tps)
                cores_b.append(c)
                pa.append(ours_prefill(gguf))
                ms, n_prompt = llama_cpp_prefill(llm)
                pb.append(ms)
            del llm
            ma, mb = statistics.median(a), statistics.median(b)
            rows.append((label, ty, ma, mb, statistics.median(cores_a), statistics.median(cores_b),
                         statistics.median(pa), statistics.median(pb), n_prompt))
            print(f"{label} {ty}: model-node {ma:,.0f} tok/s, llama.cpp {mb:,.0f} tok/s", flush=True)
    print(f"\nbatch 1, greedy from BOS, {TOKENS} tokens, {THREADS} threads, device {DEVICE}, "
          f"median of {ROUNDS} interleaved rounds\n")
    print("| model | GGUF type | model-node tok/s | llama.cpp tok/s | ratio | cores used (node / llama.cpp) "
          "| prefill ms, node / llama.cpp (prompt tokens) | prefill ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, ty, ma, mb, ca, cb, pa, pb, n in rows:
        print(f"| {label} | {ty.upper()} | {ma:,.0f} | {mb:,.0f} | {ma / mb:.2f}x | {ca:.1f} / {cb:.1f} "
              f"| {pa:,.1f} / {pb:,.1f} ({n}) | {pb / pa:.2f}x |")


if __name__ == "__main__":
    main()
