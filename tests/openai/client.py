"""The coordinator's OpenAI-compatible API through the official `openai` client (tests/openai/check.sh).

Every call is a real HTTP request to `ensemble up` on the bundled models; the answers are checked
exactly where the bundled models are deterministic (greedy) and known: "What is 347 + 58?" -> "405".
"""

import os
import sys
import time

import openai

BASE = os.environ["ENSEMBLE_HTTP"] + "/v1"
KEY = os.environ["ENSEMBLE_KEY"]
QUESTION = [{"role": "user", "content": "What is 347 + 58?"}]

client = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=120)
rows = []


def check(name, cond, detail=""):
    rows.append((name, "ok" if cond else "FAIL", detail))
    if not cond:
        print(f"FAIL {name}: {detail}", file=sys.stderr)


ids = [m.id for m in client.models.list()]
check("models.list", ids == ["ensemble", "specfuse", "chared", "colm", "pipeline", "arith", "atlas", "general"], ids)
check("models.retrieve", client.models.retrieve("atlas").id == "atlas")

for model in ["ensemble", "chared", "arith"]:
    t = time.monotonic()
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=64)
    ms = (time.monotonic() - t) * 1e3
    msg = r.choices[0].message
    extra = r.model_extra or {}
    check(
        f"chat {model}",
        msg.content == "405" and r.choices[0].finish_reason == "stop",
        f"{msg.content!r} reasoning={extra.get('ensemble', {}).get('reasoning')!r} {ms:.0f} ms",
    )

chunks = list(
    client.chat.completions.create(
        model="specfuse",
        messages=QUESTION,
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ensemble": {"specfuse": {"segment_tokens": 32, "exit": False}}},
    )
)
content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
reasoning = "".join(
    (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
)
usage = chunks[-1].usage
check(
    "chat stream specfuse",
    content == "405" and reasoning == "347+058=504" and usage is not None and usage.completion_tokens > 0,
    f"{len(chunks)} chunks, content={content!r} reasoning={reasoning!r}",
)

# Co-LLM: the generalist writes, its deferral head hands words to the arithmetic specialist; the
# spans (who wrote what) spell the whole answer, reasoning block included.
r = client.chat.completions.create(model="colm", messages=QUESTION, max_tokens=64)
ens = r.model_extra["ensemble"]
spelled = "".join(s["text"] for s in ens["spans"])
check(
    "chat colm",
    r.choices[0].message.content == "405"
    and ens["deferrals"] > 0
    and spelled == f"<think>{ens['reasoning']}</think>405"
    and {s["node"] for s in ens["spans"] if s["deferred"]} == {"arith"},
    f"{len(ens['spans'])} spans, {ens['deferrals']} deferrals, {ens['node_calls']} node calls",
)
# FSLM: the generalist drafts, the draft's form routes the answer to the specialist.
r = client.chat.completions.create(model="pipeline", messages=QUESTION, max_tokens=64)
stages = r.model_extra["ensemble"]["stages"]
check(
    "chat pipeline",
    r.choices[0].message.content == "405" and [(s["name"], s["node"]) for s in stages] == [("draft", "general"), ("answer", "arith")],
    repr([(s["name"], s["node"], s["text"]) for s in stages]),
)
try:
    client.chat.completions.create(
        model="colm", messages=QUESTION, extra_body={"ensemble": {"colm": {"assistants": ["nobody"]}}}
    )
    check("bad colm option", False, "no error")
except openai.BadRequestError as e:
    check("unknown assistant -> 400", "colm.assistants" in e.message, e.message)

r = client.completions.create(
    model="atlas",
    prompt="The Tarn flows",
    max_tokens=24,
    stop=["\n"],
    extra_body={"ensemble": {"max_chars": 20}},
)
check(
    "completions atlas",
    r.object == "text_completion" and len(r.choices[0].text) <= 20 and r.model_extra["ensemble"]["strategy"] == "single:atlas",
    repr(r.choices[0].text),
)
streamed = "".join(
    c.choices[0].text for c in client.completions.create(model="chared", prompt="The Tarn flows", max_tokens=16, stream=True) if c.choices
)
whole = client.completions.create(model="chared", prompt="The Tarn flows", max_tokens=16).choices[0].text
check("completions stream = unary", streamed == whole, repr(streamed))

try:
    client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    check("unknown model", False, "no error")
except openai.NotFoundError as e:
    check("unknown model -> 404", e.code == "model_not_found", e.message)
try:
    client.chat.completions.create(model="ensemble", messages=QUESTION, extra_body={"ensemble": {"specfuse": {"segment": 1}}})
    check("bad option", False, "no error")
except openai.BadRequestError as e:
    check("bad ensemble option -> 400", "segment" in e.message, e.message)
try:
    openai.OpenAI(base_url=BASE, api_key="sk-wrong", max_retries=0).models.list()
    check("wrong key", False, "no error")
except openai.AuthenticationError as e:
    check("wrong key -> 401", e.status_code == 401, e.message)

width = max(len(n) for n, _, _ in rows)
for name, status, detail in rows:
    print(f"{name:<{width}}  {status:<4}  {detail}")
sys.exit(0 if all(s == "ok" for _, s, _ in rows) else 1)
