"""Load test of a running `quantease serve` (any OpenAI-compatible vLLM server).

    python benchmarks/serve_load.py http://127.0.0.1:8000/v1 [--clients 64] [--duration 120] [--max-tokens 64]

Plain HTTP (urllib, one thread per client): no client library needed on the machine under test.
N clients loop for `duration` seconds, each sending streamed completions (ignore_eos, so every request must
return exactly --max-tokens tokens). Requests in flight when the time is up are waited for (--drain seconds).
Reports: requests ok / errors / lost (no final chunk, wrong token count, or unfinished after the drain),
TTFT and TPOT p50/p99, output tokens/s. Exit status 1 when any request erred or was lost.
"""
import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def get_json(url, timeout=60):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def stream_completion(url, body, timeout):
    """Yield (arrival time, parsed chunk) of one streamed completion (server-sent events)."""
    req = urllib.request.Request(url + "/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield time.perf_counter(), json.loads(data)


def one_request(args, model, prompt, stats, lock):
    body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    first = last = finish = usage = None
    for now, chunk in stream_completion(args.url, body, args.request_timeout):
        if chunk.get("usage"):
            usage = chunk["usage"]["completion_tokens"]
        for ch in chunk.get("choices", []):
            if ch.get("text"):
                first = first or now
                last = now
            finish = ch.get("finish_reason") or finish
    with lock:
        if finish is None or usage != args.max_tokens or first is None:
            stats["lost"] += 1
            stats["lost_why"].append(f"finish={finish} tokens={usage}")
            return
        stats["ok"] += 1
        stats["tokens"] += usage
        stats["ttft"].append(first - t0)
        if usage > 1:
            stats["tpot"].append((last - first) / (usage - 1))


def client_loop(i, args, model, stats, lock, deadline):
    k = 0
    while time.perf_counter() < deadline:
        prompt = f"Client {i}, request {k}: write a short story about a lighthouse keeper."
        with lock:
            stats["sent"] += 1
        try:
            one_request(args, model, prompt, stats, lock)
        except Exception as e:  # an HTTP error status or a broken connection: both count as errors
            with lock:
                stats["errors"] += 1
                stats["error_msgs"].append(f"{type(e).__name__}: {str(e)[:200]}")
        k += 1


def run(args):
    model = args.model or get_json(args.url + "/models")["data"][0]["id"]
    stats = dict(sent=0, ok=0, errors=0, lost=0, tokens=0, ttft=[], tpot=[], error_msgs=[], lost_why=[])
    lock = threading.Lock()
    t0 = time.perf_counter()
    deadline = t0 + args.duration
    pool = ThreadPoolExecutor(args.clients)
    futures = [pool.submit(client_loop, i, args, model, stats, lock, deadline) for i in range(args.clients)]
    _, pending = wait(futures, timeout=args.duration + args.drain)
    with lock:
        stats["lost"] += len(pending)  # clients whose last request was still in flight after the drain
    stats["wall_s"] = time.perf_counter() - t0
    stats["model"] = model
    pool.shutdown(wait=False, cancel_futures=True)
    return stats


def summary(s, args):
    ms = 1e3
    return {
        "model": s["model"], "clients": args.clients, "duration_s": args.duration, "max_tokens": args.max_tokens,
        "requests_sent": s["sent"], "requests_ok": s["ok"], "errors": s["errors"], "lost": s["lost"],
        "output_tokens": s["tokens"], "wall_s": round(s["wall_s"], 1),
        "output_tok_per_s": round(s["tokens"] / s["wall_s"], 1),
        "ttft_p50_ms": round(pct(s["ttft"], 50) * ms, 1), "ttft_p99_ms": round(pct(s["ttft"], 99) * ms, 1),
        "tpot_p50_ms": round(pct(s["tpot"], 50) * ms, 2), "tpot_p99_ms": round(pct(s["tpot"], 99) * ms, 2),
        "tpot_mean_ms": round(statistics.fmean(s["tpot"]) * ms, 2) if s["tpot"] else None,
        "first_errors": s["error_msgs"][:3], "first_lost": s["lost_why"][:3],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=120.0, help="seconds during which clients send requests")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--drain", type=float, default=300.0, help="seconds to wait for requests in flight at the end")
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    out = summary(run(args), args)
    print("| " + " | ".join(out) + " |")
    print("|" + "---|" * len(out))
    print("| " + " | ".join(str(v) for v in out.values()) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if out["errors"] == 0 and out["lost"] == 0 and out["requests_ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
