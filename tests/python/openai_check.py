"""Drives Realm's OpenAI-compatible HTTP API with the official `openai` package.

Usage: openai_check.py BASE_URL (e.g. http://127.0.0.1:8080/v1). Prints one JSON object with what
each call returned; the Rust test `tests/tests/http.rs` asserts on it.
"""

import json
import sys

import openai
from openai import OpenAI


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
