"""The llama.cpp side of scripts/bench-vs-pytorch.sh's `decode:smollm2`: llama-cpp-python (built in
the script's venv) runs the same GGUF, quantised as it is, at the same thread count, on the same
workload as `palm bench decode --model`: batch 1, the 16-id prompt of `palm bench`, then
`--new-tokens` tokens sampled at temperature 1 (no top-k, top-p or min-p, no repetition penalty,
no early stop), prefill included in the time. Prints one JSON object.
"""
import argparse, json, resource, statistics, time

from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a GGUF file")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    llm = Llama(model_path=a.model, n_ctx=512, n_threads=a.threads, n_threads_batch=a.threads,
                n_batch=512, seed=0, verbose=False)
    prompt = [(j * 7) % 255 + 1 for j in range(16)]  # palm bench's prompt 0

    def step():
        n = 0
        for _ in llm.generate(prompt, temp=1.0, top_k=0, top_p=1.0, min_p=0.0,
                              repeat_penalty=1.0, reset=True):
            n += 1
            if n == a.new_tokens:
                break
        return n

    step()  # warm-up
    times = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        n = step()
        times.append(time.perf_counter() - t0)
        assert n == a.new_tokens, n
    secs = statistics.median(times)
    print(json.dumps({"workload": "decode", "model": a.model, "engine": "llama.cpp",
                      "tokens_per_run": a.new_tokens, "median_seconds": secs,
                      "tokens_per_sec": a.new_tokens / secs, "threads": a.threads,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                      "all_seconds": times}))


if __name__ == "__main__":
    main()
