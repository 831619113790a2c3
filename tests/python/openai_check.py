"""Drives Realm's OpenAI-compatible HTTP API with the official `openai` package.

Usage: openai_check.py BASE_URL (e.g. http://127.0.0.1:8080/v1). Prints one JSON object with what
each call returned; the Rust test `tests/tests/http.rs` asserts on it.
"""

import json
import math
import sys

import openai
from openai import OpenAI


PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def check_completion_logprobs(lp, text, greedy=True):
    """The legacy shape: parallel lists whose tokens join to the text."""
    n = len(lp.tokens)
    assert n > 0, lp
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n, lp
    assert "".join(lp.tokens) == text, (lp.tokens, text)
    offset = 0
    for token, logprob, top, at in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset):
        assert at == offset, (lp.text_offset, lp.tokens)
        offset += len(token)
        assert logprob <= 0 and math.isfinite(logprob), logprob
        # The chosen token is always among them, with its own logprob.
        assert top[token] == logprob, (token, logprob, top)
        if greedy:
            assert logprob == max(top.values()), (token, logprob, top)


def check_chat_logprobs(content, text, top_n, greedy=True):
    """Chat's shape: one entry per token, with bytes that join to the text."""
    assert len(content) > 0
    assert b"".join(bytes(e.bytes) for e in content) == text.encode(), (content, text)
    for e in content:
        assert e.logprob <= 0 and math.isfinite(e.logprob), e
        assert len(e.top_logprobs) == top_n, e
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True), e
        mine = [t for t in e.top_logprobs if t.token == e.token]
        if mine:
            assert mine[0].logprob == e.logprob and mine[0].bytes == e.bytes, e
        if greedy:
            assert mine and e.logprob == tops[0], e


def dump_chat(content):
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": e.bytes,
            "top": [[t.token, t.logprob] for t in e.top_logprobs],
        }
        for e in content
    ]


def logprobs(client, model):
    """Logprobs on both endpoints, streamed and not; the JSON the Rust test compares."""
    out = {}
    c = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3
    )
    lp, text = c.choices[0].logprobs, c.choices[0].text
    check_completion_logprobs(lp, text)
    out["completion"] = {
        "text": text,
        "tokens": lp.tokens,
        "token_logprobs": lp.token_logprobs,
        "top_logprobs": lp.top_logprobs,
        "text_offset": lp.text_offset,
    }

    stream = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3, stream=True
    )
    tokens, token_logprobs, top_logprobs, offsets, pieces = [], [], [], [], []
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.text)
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                token_logprobs += choice.logprobs.token_logprobs
                top_logprobs += choice.logprobs.top_logprobs
                offsets += choice.logprobs.text_offset
                # Each chunk carries the tokens of its text.
                assert "".join(choice.logprobs.tokens) == choice.text, choice
    assert "".join(pieces) == text, (pieces, text)
    assert (tokens, token_logprobs, top_logprobs, offsets) == (
        lp.tokens,
        lp.token_logprobs,
        lp.top_logprobs,
        lp.text_offset,
    ), (tokens, token_logprobs)

    # A stop string: the logprobs cover exactly the text before it.
    s = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1, stop=["."]
    )
    check_completion_logprobs(s.choices[0].logprobs, s.choices[0].text)
    out["stopped"] = {"text": s.choices[0].text, "tokens": s.choices[0].logprobs.tokens}

    chat = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content, text = chat.choices[0].logprobs.content, chat.choices[0].message.content
    check_chat_logprobs(content, text, 3)
    out["chat"] = {"text": text, "content": dump_chat(content)}

    stream = client.chat.completions.create(
        model=model,
        messages=CHAT,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    streamed, pieces = [], []
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.logprobs is not None and choice.logprobs.content:
                streamed += choice.logprobs.content
                piece = b"".join(bytes(e.bytes) for e in choice.logprobs.content)
                assert piece == (choice.delta.content or "").encode(), choice
    assert "".join(pieces) == text
    assert dump_chat(streamed) == dump_chat(content)

    # Sampled, no alternatives: the chosen tokens' logprobs alone, still the model's.
    sampled = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=8, temperature=0.9, seed=7, logprobs=True
    )
    check_chat_logprobs(
        sampled.choices[0].logprobs.content, sampled.choices[0].message.content, 0, greedy=False
    )
    return out


def main() -> None:
    (base_url,) = sys.argv[1:]
    # Realm does not check keys; the client insists on one.
    client = OpenAI(base_url=base_url, api_key="realm-test-key", max_retries=0, timeout=300)
    out = {"openai_version": openai.__version__}

    out["models"] = [m.id for m in client.models.list().data]
    model = out["models"][0]

    stream = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chat = {"pieces": [], "finish_reason": None, "usage": None, "role": None}
    for chunk in stream:
        if chunk.usage is not None:
            chat["usage"] = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.role:
                chat["role"] = choice.delta.role
            if choice.delta.content:
                chat["pieces"].append(choice.delta.content)
            if choice.finish_reason:
                chat["finish_reason"] = choice.finish_reason
    out["chat_stream"] = chat

    c = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    out["completion"] = {
        "text": c.choices[0].text,
        "finish_reason": c.choices[0].finish_reason,
        "usage": c.usage.model_dump(),
        "object": c.object,
    }

    seeded = [
        client.completions.create(
            model=model,
            prompt="Once upon a time",
            max_tokens=12,
            temperature=0.9,
            top_p=0.95,
            seed=1234,
        ).choices[0].text
        for _ in range(2)
    ]
    out["seeded"] = seeded

    s = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=16, temperature=0, stop=["."]
    )
    out["stopped"] = {"text": s.choices[0].text, "finish_reason": s.choices[0].finish_reason}

    out["logprobs"] = logprobs(client, model)

    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
        out["unknown_model"] = {"status": None}
    except openai.APIStatusError as e:
        out["unknown_model"] = {"status": e.status_code, "body": e.body}

    print(json.dumps(out))


if __name__ == "__main__":
    main()
