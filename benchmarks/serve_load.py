"""Load test of a running `quantease serve` (any OpenAI-compatible vLLM server).

    python benchmarks/serve_load.py http://127.0.0.1:8000/v1 [--clients 64] [--duration 120] [--max-tokens 64]

N clients loop for `duration` seconds, each sending streamed completions (ignore_eos, so every request must
return exactly --max-tokens tokens). Requests in flight when the time is up are waited for (--drain seconds).
Reports: requests ok / errors / lost (no final chunk, wrong token count, or unfinished after the drain),
TTFT and TPOT p50/p99, output tokens/s. Exit status 1 when any request erred or was lost.
"""
import argparse
import asyncio
import json
import statistics
import sys
import time


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one_request(client, model, prompt, max_tokens, stats):
    t0 = time.perf_counter()
    first = last = None
    n = 0
    finish = usage = None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for ch in chunk.choices:
            if ch.text:
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
            finish = ch.finish_reason or finish
    if finish is None or usage != max_tokens or first is None:
        stats["lost"] += 1
        stats["lost_why"].append(f"finish={finish} tokens={usage}")
        return
    stats["ok"] += 1
    stats["tokens"] += usage
    stats["ttft"].append(first - t0)
    if usage > 1:
        stats["tpot"].append((last - first) / (usage - 1))


async def client_loop(i, client, model, args, stats, deadline):
    k = 0
    while time.perf_counter() < deadline:
        prompt = f"Client {i}, request {k}: write a short story about a lighthouse keeper."
        stats["sent"] += 1
        try:
            await one_request(client, model, prompt, args.max_tokens, stats)
        except Exception as e:  # the server's answer or the connection: both count as errors
            stats["errors"] += 1
            stats["error_msgs"].append(f"{type(e).__name__}: {str(e)[:200]}")
        k += 1


async def run(args):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=args.url, api_key="none", max_retries=0, timeout=args.request_timeout)
    model = args.model or (await client.models.list()).data[0].id
    stats = dict(sent=0, ok=0, errors=0, lost=0, tokens=0, ttft=[], tpot=[], error_msgs=[], lost_why=[])
    t0 = time.perf_counter()
    deadline = t0 + args.duration
    tasks = [asyncio.create_task(client_loop(i, client, model, args, stats, deadline)) for i in range(args.clients)]
    done, pending = await asyncio.wait(tasks, timeout=args.duration + args.drain)
    for t in pending:  # still in flight after the drain: lost
        t.cancel()
    stats["lost"] += len(pending)
    stats["wall_s"] = time.perf_counter() - t0
    stats["model"] = model
    await client.close()
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
    out = summary(asyncio.run(run(args)), args)
    print("| " + " | ".join(out) + " |")
    print("|" + "---|" * len(out))
    print("| " + " | ".join(str(v) for v in out.values()) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if out["errors"] == 0 and out["lost"] == 0 and out["requests_ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
