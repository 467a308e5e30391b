"""Checks an OpenAI-compatible server (`palm serve`) with the official `openai` client, unchanged.

    python scripts/openai_client.py --base-url http://127.0.0.1:PORT/v1 --api-key TOKEN

Checks, in order: `models.list()`; a chat completion (usage adds up, finish_reason stop/length);
the same request streamed with `stream_options.include_usage` (same text and usage for the same
seed, one usage chunk with empty choices at the end); `max_completion_tokens`; `stop`; `n=2`; a
text completion, plain and streamed; and errors: an unknown model raises `NotFoundError`, a bad
key `AuthenticationError`, `temperature=5` `BadRequestError`, each with OpenAI's error fields.
Exits 1 at the first mismatch with what was expected and what came back.
"""

import argparse
import sys

import openai
from openai import OpenAI

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]
PROMPT = "Once upon a time, in a small village,"


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


def check_usage(usage, where, max_tokens=None):
    check(usage is not None, f"{where}: no usage")
    p, c, t = usage.prompt_tokens, usage.completion_tokens, usage.total_tokens
    check(isinstance(p, int) and p > 0, f"{where}: usage.prompt_tokens = {p!r}, want a positive int")
    check(isinstance(c, int) and c >= 0, f"{where}: usage.completion_tokens = {c!r}")
    check(t == p + c, f"{where}: usage.total_tokens = {t}, want prompt {p} + completion {c} = {p + c}")
    if max_tokens is not None:
        check(c <= max_tokens, f"{where}: {c} completion tokens > max_tokens {max_tokens}")


def check_finish(reason, where):
    check(reason in ("stop", "length"), f"{where}: finish_reason = {reason!r}, want 'stop' or 'length'")


def expect_error(exc_type, where, call, **fields):
    """Runs `call`, which must raise `exc_type`; checks the error's OpenAI fields."""
    try:
        r = call()
    except exc_type as e:
        body = e.body
        check(isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"],
              f"{where}: the error body {body!r} lacks error.message")
        for k in ("type", "param", "code"):
            check(k in body, f"{where}: the error body {body!r} lacks error.{k}")
        for k, want in fields.items():
            got = getattr(e, k, None)
            check(got == want, f"{where}: error.{k} = {got!r}, want {want!r} (body {body!r})")
        print(f"  {where}: {type(e).__name__} {e.status_code}: {body['message']}")
        return
    except openai.APIError as e:
        status = getattr(e, "status_code", None)
        raise CheckFailed(f"{where}: raised {type(e).__name__} (status {status}: {e}), want {exc_type.__name__}")
    raise CheckFailed(f"{where}: no error raised, want {exc_type.__name__}; got {r!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--model-id", help="the model's id (default: the first of /v1/models)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    a = ap.parse_args()
    mt = a.max_tokens

    client = OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=a.timeout)

    # 1. models.list()
    models = list(client.models.list())
    ids = [m.id for m in models]
    check(ids, f"models.list(): no models ({models!r})")
    for m in models:
        check(m.object == "model", f"models.list(): object = {m.object!r}, want 'model'")
    model = a.model_id or ids[0]
    check(model in ids, f"models.list(): {model!r} not among {ids}")
    print(f"models: {ids}")

    # 2. A chat completion.
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=mt, seed=1)
    check(r.object == "chat.completion", f"chat: object = {r.object!r}")
    check(r.model == model, f"chat: model = {r.model!r}, want {model!r}")
    check(len(r.choices) == 1, f"chat: {len(r.choices)} choices, want 1")
    ch = r.choices[0]
    check(ch.index == 0, f"chat: choices[0].index = {ch.index}")
    check(ch.message.role == "assistant", f"chat: role = {ch.message.role!r}")
    text = ch.message.content
    check(isinstance(text, str), f"chat: content = {text!r}, want a string")
    check_finish(ch.finish_reason, "chat")
    check_usage(r.usage, "chat", mt)
    if ch.finish_reason == "length":
        check(r.usage.completion_tokens == mt,
              f"chat: finish_reason 'length' after {r.usage.completion_tokens} tokens, max_tokens {mt}")
    print(f"chat: {text!r} (finish {ch.finish_reason}, usage {r.usage.prompt_tokens}+"
          f"{r.usage.completion_tokens}={r.usage.total_tokens})")

    # 3. The same, streamed with usage.
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=mt, seed=1, stream=True,
                                            stream_options={"include_usage": True})
    parts, finish, usage_chunks, ids_seen, after_usage = [], None, [], set(), 0
    for chunk in stream:
        check(chunk.object == "chat.completion.chunk", f"chat stream: object = {chunk.object!r}")
        ids_seen.add(chunk.id)
        if usage_chunks:
            after_usage += 1
        if chunk.usage is not None:
            check(chunk.choices == [], f"chat stream: the usage chunk has choices {chunk.choices!r}, want []")
            usage_chunks.append(chunk.usage)
            continue
        check(len(chunk.choices) == 1, f"chat stream: a chunk with {len(chunk.choices)} choices")
        c = chunk.choices[0]
        check(c.index == 0, f"chat stream: choice index {c.index}")
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason is not None:
            check(finish is None, f"chat stream: a second finish_reason {c.finish_reason!r}")
            finish = c.finish_reason
    streamed = "".join(parts)
    check(len(ids_seen) == 1, f"chat stream: chunks with {len(ids_seen)} different ids")
    check(len(usage_chunks) == 1, f"chat stream: {len(usage_chunks)} usage chunks, want 1")
    check(after_usage == 0, f"chat stream: {after_usage} chunks after the usage chunk")
    check_finish(finish, "chat stream")
    check_usage(usage_chunks[0], "chat stream", mt)
    check(streamed == text, f"chat stream: text {streamed!r} != the non-streamed {text!r} (same seed 1)")
    check(finish == ch.finish_reason, f"chat stream: finish_reason {finish!r} != non-streamed {ch.finish_reason!r}")
    u, v = usage_chunks[0], r.usage
    check((u.prompt_tokens, u.completion_tokens) == (v.prompt_tokens, v.completion_tokens),
          f"chat stream: usage {u} != non-streamed {v}")
    print(f"chat stream: {len(parts)} content deltas, same text, finish and usage as non-streamed")

    # 4. max_completion_tokens (the newer name of max_tokens).
    small = min(4, mt)
    r4 = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=small, seed=1)
    check_usage(r4.usage, "max_completion_tokens", small)
    check_finish(r4.choices[0].finish_reason, "max_completion_tokens")
    print(f"max_completion_tokens={small}: {r4.choices[0].message.content!r} "
          f"({r4.usage.completion_tokens} tokens, finish {r4.choices[0].finish_reason})")

    # 5. stop: a word from the middle of the seed-1 reply cuts the same reply just before it.
    words = [w for w in text.split() if len(w) >= 2]
    stop_word = next((w for w in words[1:] if text.index(w) > 0), None)
    if stop_word is None:
        print(f"stop: skipped (the reply {text!r} has no second word to stop at)")
    else:
        r5 = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=mt, seed=1, stop=[stop_word])
        t5 = r5.choices[0].message.content
        want = text[: text.index(stop_word)]
        check(stop_word not in t5, f"stop={stop_word!r}: the reply {t5!r} contains the stop sequence")
        check(r5.choices[0].finish_reason == "stop",
              f"stop={stop_word!r}: finish_reason {r5.choices[0].finish_reason!r}, want 'stop'")
        check(t5 == want, f"stop={stop_word!r}: reply {t5!r}, want {want!r} (seed-1 reply cut before the stop)")
        print(f"stop={stop_word!r}: {t5!r} (finish stop)")

    # 6. n=2.
    r6 = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=mt, seed=2, n=2)
    check(len(r6.choices) == 2, f"n=2: {len(r6.choices)} choices")
    check(sorted(c.index for c in r6.choices) == [0, 1], f"n=2: indexes {[c.index for c in r6.choices]}")
    for c in r6.choices:
        check(isinstance(c.message.content, str), f"n=2: choice {c.index} content {c.message.content!r}")
        check_finish(c.finish_reason, f"n=2 choice {c.index}")
    check_usage(r6.usage, "n=2", 2 * mt)
    print(f"n=2: {[c.message.content for c in r6.choices]!r} (usage {r6.usage.prompt_tokens}+"
          f"{r6.usage.completion_tokens}={r6.usage.total_tokens})")

    # 7. A text completion, plain and streamed.
    r7 = client.completions.create(model=model, prompt=PROMPT, max_tokens=mt, seed=3, temperature=0.7)
    check(r7.object == "text_completion", f"completions: object = {r7.object!r}")
    check(len(r7.choices) == 1, f"completions: {len(r7.choices)} choices")
    t7 = r7.choices[0].text
    check(isinstance(t7, str), f"completions: text = {t7!r}")
    check_finish(r7.choices[0].finish_reason, "completions")
    check_usage(r7.usage, "completions", mt)
    print(f"completions: {PROMPT!r} -> {t7!r} (finish {r7.choices[0].finish_reason}, usage "
          f"{r7.usage.prompt_tokens}+{r7.usage.completion_tokens}={r7.usage.total_tokens})")
    s7 = client.completions.create(model=model, prompt=PROMPT, max_tokens=mt, seed=3, temperature=0.7, stream=True,
                                   stream_options={"include_usage": True})
    parts7, usage7 = [], None
    for chunk in s7:
        if chunk.usage is not None:
            usage7 = chunk.usage
        for c in chunk.choices:
            parts7.append(c.text or "")
    check("".join(parts7) == t7, f"completions stream: {''.join(parts7)!r} != non-streamed {t7!r} (same seed)")
    check_usage(usage7, "completions stream", mt)
    check(usage7.completion_tokens == r7.usage.completion_tokens,
          f"completions stream: usage {usage7} != non-streamed {r7.usage}")
    print("completions stream: same text and usage as non-streamed")

    # 8. Errors.
    expect_error(openai.NotFoundError, "model='nope'",
                 lambda: client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=mt))
    bad = OpenAI(base_url=a.base_url, api_key="not-a-valid-token", max_retries=0, timeout=a.timeout)
    expect_error(openai.AuthenticationError, "bad api key",
                 lambda: bad.chat.completions.create(model=model, messages=MESSAGES, max_tokens=mt))
    expect_error(openai.AuthenticationError, "bad api key, models.list()", lambda: list(bad.models.list()))
    expect_error(openai.BadRequestError, "temperature=5",
                 lambda: client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=mt, temperature=5),
                 param="temperature")
    expect_error(openai.BadRequestError, "stream with temperature=5",
                 lambda: list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=mt,
                                                             temperature=5, stream=True)),
                 param="temperature")

    print(f"openai client: all checks passed (openai {openai.__version__})")


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as e:
        print(f"openai client: CHECK FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    except openai.APIError as e:
        body = getattr(e, "body", None)
        status = getattr(e, "status_code", None)
        print(f"openai client: FAILED: the client raised {type(e).__name__} (status {status}): {e}\n"
              f"  error body: {body!r}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # a response the client could not parse, a connection error, ...
        import traceback

        traceback.print_exc()
        print(f"openai client: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
