"""A bounded load test of an OpenAI-compatible server (`palm serve`, llama.cpp's server, ...).

    python3 scripts/bench_serve.py --base-url http://127.0.0.1:PORT/v1 --api-key TOKEN \
        [--model ID] [--clients 1 4 16] [--duration 20] [--max-tokens 64]

For each N in --clients, N threads loop for --duration seconds, each sending streamed chat
completions (`stream_options.include_usage`) of a fixed set of short prompts in turn, temperature
0.7 and a different seed each time; a request started before the deadline runs to its end. Per
request: latency (send to `[DONE]`), time to first token (the first non-empty content delta),
completion tokens (the usage chunk; the count of content deltas when the server sends none) and
the HTTP status. Per N: requests/s and generated tokens/s (over the time until the last request
ended), p50/p95 latency and TTFT, errors by status. A table goes to stderr, one JSON object per N
to stdout.

    python3 scripts/bench_serve.py --compare A.jsonl B.jsonl

prints the ratios of two runs' results (A over B) per N. Standard library only.
"""

import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for better sleep.",
    "Explain what a hash table is in one sentence.",
    "What is 17 times 23?",
    "Name a famous painting and its painter.",
    "How do plants make their food?",
    "Suggest a name for a small orange cat.",
]


def percentile(xs, q):
    """Linear interpolation between closest ranks; None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Target:
    def __init__(self, base_url, api_key, timeout):
        u = urllib.parse.urlsplit(base_url.rstrip("/"))
        if u.scheme not in ("http", "https"):
            raise SystemExit(f"error: --base-url {base_url}: want http://HOST:PORT/v1")
        self.https = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.https else 80)
        self.prefix = u.path  # e.g. /v1
        self.api_key = api_key
        self.timeout = timeout

    def connect(self):
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def headers(self):
        h = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def get_json(self, path):
        c = self.connect()
        try:
            c.request("GET", self.prefix + path, headers=self.headers())
            r = c.getresponse()
            body = r.read()
            if r.status != 200:
                raise SystemExit(f"error: GET {self.prefix}{path}: {r.status} {body[:300]!r}")
            return json.loads(body)
        finally:
            c.close()


class Result:
    __slots__ = ("start", "end", "latency", "ttft", "tokens", "usage_from", "error")

    def __init__(self):
        self.start = self.end = self.latency = self.ttft = None
        self.tokens = 0
        self.usage_from = None
        self.error = None


def one_request(conn, target, body):
    """Sends one streamed chat completion on `conn`; returns (Result, keep the connection)."""
    res = Result()
    res.start = time.monotonic()
    try:
        conn.request("POST", target.prefix + "/chat/completions", body=body, headers=target.headers())
        resp = conn.getresponse()
        if resp.status != 200:
            detail = resp.read()[:300]
            res.error = str(resp.status)
            res.end = time.monotonic()
            return res, detail
        deltas, usage, done = 0, None, False
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, `: keep-alive` comments, `event:` lines
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                res.error = "stream-error"
                break
            for c in chunk.get("choices") or []:
                content = (c.get("delta") or {}).get("content")
                if content:
                    if res.ttft is None:
                        res.ttft = time.monotonic() - res.start
                    deltas += 1
            if chunk.get("usage"):
                usage = chunk["usage"]
        if done:
            resp.read()  # the rest of the chunked body, so that the connection can be reused
        elif res.error is None:
            res.error = "no-[DONE]"
        res.end = time.monotonic()
        res.latency = res.end - res.start
        if usage is not None and usage.get("completion_tokens") is not None:
            res.tokens, res.usage_from = int(usage["completion_tokens"]), "usage"
        else:
            res.tokens, res.usage_from = deltas, "deltas"
        return res, None
    except (OSError, http.client.HTTPException, ValueError) as e:
        res.error = f"conn:{type(e).__name__}"
        res.end = time.monotonic()
        return res, str(e)


def client_loop(idx, target, model, args, deadline, out, details):
    conn = target.connect()
    i = 0
    while time.monotonic() < deadline:
        prompt = PROMPTS[(idx + i) % len(PROMPTS)]
        body = json.dumps({
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "seed": idx * 100003 + i,
            "stream": True,
            "stream_options": {"include_usage": True},
        })
        res, detail = one_request(conn, target, body)
        out.append(res)
        i += 1
        if res.error is not None:
            if detail is not None and res.error not in details:
                details[res.error] = detail
            conn.close()
            conn = target.connect()
            time.sleep(0.2)  # no hot loop on 503s or a dead server
    conn.close()


def run_level(target, model, n, args):
    deadline = time.monotonic() + args.duration
    results = [[] for _ in range(n)]
    details = {}
    t0 = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(k, target, model, args, deadline, results[k], details),
                                daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rs = [r for rr in results for r in rr]
    elapsed = max([r.end for r in rs], default=time.monotonic()) - t0
    ok = [r for r in rs if r.error is None]
    errors = {}
    for r in rs:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    lat = [r.latency for r in ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tokens = sum(r.tokens for r in ok)
    sources = sorted({r.usage_from for r in ok})
    return {
        "server": args.label,
        "base_url": args.base_url,
        "model": model,
        "clients": n,
        "duration_s": args.duration,
        "elapsed_s": round(elapsed, 3),
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "requests": len(ok),
        "errors": errors,
        "error_examples": {k: v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                           for k, v in details.items()},
        "completion_tokens": tokens,
        "tokens_counted_from": sources[0] if len(sources) == 1 else sources,
        "req_per_s": round(len(ok) / elapsed, 4) if elapsed > 0 else None,
        "tok_per_s": round(tokens / elapsed, 3) if elapsed > 0 else None,
        "latency_p50_s": rnd(percentile(lat, 0.5)),
        "latency_p95_s": rnd(percentile(lat, 0.95)),
        "ttft_p50_s": rnd(percentile(ttft, 0.5)),
        "ttft_p95_s": rnd(percentile(ttft, 0.95)),
        "mean_tokens": round(tokens / len(ok), 2) if ok else None,
    }


def rnd(x):
    return None if x is None else round(x, 4)


def fmt(x, spec):
    """`format(x, spec)`, or a dash as wide as the spec's width for None."""
    if x is None:
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 1)
    return format(x, spec)


HEADER = (f"{'server':<10} {'N':>3} {'reqs':>5} {'req/s':>7} {'tok/s':>8} {'tok/req':>7} {'lat p50':>8} "
          f"{'lat p95':>8} {'ttft p50':>8} {'ttft p95':>8}  errors")


def row(s):
    errs = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "0"
    return (f"{s['server'][:10]:<10} {s['clients']:>3} {s['requests']:>5} {fmt(s['req_per_s'], '7.3f')} "
            f"{fmt(s['tok_per_s'], '8.2f')} {fmt(s['mean_tokens'], '7.1f')} {sec(s['latency_p50_s'])} "
            f"{sec(s['latency_p95_s'])} {sec(s['ttft_p50_s'])} {sec(s['ttft_p95_s'])}  {errs}")


def sec(x):
    return fmt(None, "8") if x is None else fmt(x, "7.2f") + "s"


def compare(a_path, b_path):
    def load(p):
        with open(p) as f:
            return {d["clients"]: d for d in (json.loads(line) for line in f if line.strip())}

    a, b = load(a_path), load(b_path)
    if not a or not b:
        raise SystemExit(f"error: --compare: no results in {a_path if not a else b_path}")
    na = next(iter(a.values()))["server"]
    nb = next(iter(b.values()))["server"]
    print(f"\n{na} / {nb} (above 1: {na} serves more per second, or waits longer for latencies)", file=sys.stderr)
    print(f"{'N':>3} {'req/s':>8} {'tok/s':>8} {'lat p50':>8} {'ttft p50':>8}", file=sys.stderr)

    def ratio(x, y):
        return None if x is None or y in (None, 0) else x / y

    for n in sorted(set(a) & set(b)):
        x, y = a[n], b[n]
        r = {k: ratio(x[k], y[k]) for k in ("req_per_s", "tok_per_s", "latency_p50_s", "ttft_p50_s")}
        print(f"{n:>3} {fmt(r['req_per_s'], '8.2f')} {fmt(r['tok_per_s'], '8.2f')} "
              f"{fmt(r['latency_p50_s'], '8.2f')} {fmt(r['ttft_p50_s'], '8.2f')}", file=sys.stderr)
        print(json.dumps({"compare": f"{na}/{nb}", "clients": n, **{k + "_ratio": rnd(v) for k, v in r.items()}}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", help="e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default="", help="sent as `Authorization: Bearer KEY` (none if empty)")
    ap.add_argument("--model", help="the model id (default: the first of GET /models)")
    ap.add_argument("--clients", nargs="+", default=["1", "4", "16"],
                    help="concurrent clients per level, e.g. 1 4 16 or '1 4 16'")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--timeout", type=float, default=300.0, help="socket timeout per request, seconds")
    ap.add_argument("--warmup", type=int, default=1, help="requests sent (and not counted) first")
    ap.add_argument("--label", default="palm", help="the server's name in the table and JSON")
    ap.add_argument("--compare", nargs=2, metavar=("A.jsonl", "B.jsonl"), help="print A/B ratios and exit")
    args = ap.parse_args()

    if args.compare:
        compare(*args.compare)
        return
    if not args.base_url:
        ap.error("--base-url is required (or --compare)")
    levels = [int(x) for item in args.clients for x in str(item).replace(",", " ").split()]
    if not levels or min(levels) < 1:
        ap.error("--clients wants positive numbers")

    target = Target(args.base_url, args.api_key, args.timeout)
    model = args.model
    if not model:
        data = target.get_json("/models").get("data") or []
        if not data:
            raise SystemExit("error: GET /models listed no model; pass --model")
        model = data[0]["id"]
    print(f"bench {args.label}: {args.base_url} model {model!r}, clients {levels}, {args.duration:g}s each, "
          f"max_tokens {args.max_tokens}, temperature {args.temperature}", file=sys.stderr)

    for w in range(args.warmup):
        conn = target.connect()
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPTS[w % len(PROMPTS)]}],
                           "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": 7 + w,
                           "stream": True, "stream_options": {"include_usage": True}})
        res, detail = one_request(conn, target, body)
        conn.close()
        if res.error is not None:
            raise SystemExit(f"error: the warm-up request failed: {res.error} {detail!r}")
        print(f"warm-up: {res.latency:.2f}s, {res.tokens} tokens (counted from {res.usage_from})", file=sys.stderr)

    summaries = []
    print(HEADER, file=sys.stderr)
    for n in levels:
        s = run_level(target, model, n, args)
        summaries.append(s)
        print(json.dumps(s), flush=True)
        print(row(s), file=sys.stderr, flush=True)
        for k, v in s["error_examples"].items():
            print(f"    {k}: {v[:200]}", file=sys.stderr)
    if any(s["tokens_counted_from"] not in ("usage", []) for s in summaries):
        print("note: no usage chunk in some streams; their tokens are counted as content deltas", file=sys.stderr)
    if len(levels) > 1:
        print(f"\n{HEADER}", file=sys.stderr)
        for s in summaries:
            print(row(s), file=sys.stderr)


if __name__ == "__main__":
    main()
