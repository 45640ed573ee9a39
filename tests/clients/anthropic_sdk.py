"""Drives kvsnap through Anthropic's official Python SDK (installed by `make sdk` under
.cache/sdk) and prints what it saw as one JSON object; tests/clients.rs asserts on it.

    python3 tests/clients/anthropic_sdk.py tour URL KEY
    python3 tests/clients/anthropic_sdk.py turn URL KEY SESSION MESSAGES_JSON
    python3 tests/clients/anthropic_sdk.py tools URL KEY GRAMMAR

`tour` tries every route and shape once; `turn` sends one turn of a named conversation (the
whole history, as Anthropic's clients do) and prints its reply and usage. `tools` offers a
tool (the reply held to one call by GRAMMAR), reads the call streamed and not, and sends its
result back, as an agent does.
"""

import json
import sys

import anthropic

# The SDK of 2026 has no sampling arguments of its own; llama-server's fields go in the body.
GREEDY = {"temperature": 0}
MODEL = "any"  # kvsnap serves one model, whatever a request names


def client(url, key):
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)


def status_error(call):
    """The SDK's exception for a refused request, as data."""
    try:
        call()
    except anthropic.APIStatusError as error:
        body = error.body if isinstance(error.body, dict) else {}
        return {
            "class": type(error).__name__,
            "status": error.status_code,
            "type": body.get("error", {}).get("type"),
            "message": body.get("error", {}).get("message"),
        }
    return None


def tour(url, key):
    c = client(url, key)
    system = "You answer in one short sentence."
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": [{"type": "text", "text": "Name a fruit."}]},
    ]
    made = c.messages.create(
        model=MODEL, max_tokens=24, system=system, messages=messages, extra_body=GREEDY
    )
    events = []
    with c.messages.stream(
        model=MODEL, max_tokens=24, system=system, messages=messages, extra_body=GREEDY
    ) as stream:
        for event in stream:
            events.append(event.type)
        streamed = stream.get_final_message()
    counted = c.messages.count_tokens(model=MODEL, system=system, messages=messages)
    stopped = c.messages.create(
        model=MODEL,
        max_tokens=24,
        system=system,
        messages=messages,
        stop_sequences=[made.content[0].text[:3]],
        extra_body=GREEDY,
    )
    image = [
        {
            "role": "user",
            "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    return {
        "made": made.model_dump(),
        "streamed": streamed.model_dump(),
        "events": events,
        "counted": counted.input_tokens,
        "stopped": stopped.model_dump(),
        "image_error": status_error(
            lambda: c.messages.create(model=MODEL, max_tokens=8, messages=image)
        ),
        "bad_key_error": status_error(
            lambda: client(url, "not-a-key").messages.create(
                model=MODEL, max_tokens=8, messages=messages
            )
        ),
    }


def turn(url, key, session, messages):
    reply = client(url, key).messages.create(
        model=MODEL,
        max_tokens=24,
        messages=messages,
        extra_headers={"X-Session-Id": session},
        extra_body=GREEDY,
    )
    return reply.model_dump()


WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def tools(url, key, grammar):
    c = client(url, key)
    question = [{"role": "user", "content": "What is the weather in Oslo?"}]
    held = dict(GREEDY, grammar=grammar)
    made = c.messages.create(
        model=MODEL, max_tokens=64, tools=[WEATHER], messages=question, extra_body=held
    )
    with c.messages.stream(
        model=MODEL, max_tokens=64, tools=[WEATHER], messages=question, extra_body=held
    ) as stream:
        streamed = stream.get_final_message()
    call = next(block for block in made.content if block.type == "tool_use")
    answered = c.messages.create(
        model=MODEL,
        max_tokens=8,
        tools=[WEATHER],
        messages=question
        + [
            {"role": "assistant", "content": [block.model_dump() for block in made.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "4 C, rain"}],
            },
        ],
        extra_body=GREEDY,
    )
    return {
        "made": made.model_dump(),
        "streamed": streamed.model_dump(),
        "answered": answered.model_dump(),
    }


def main():
    command, url, key = sys.argv[1:4]
    if command == "tour":
        result = tour(url, key)
    elif command == "turn":
        result = turn(url, key, sys.argv[4], json.loads(sys.argv[5]))
    elif command == "tools":
        result = tools(url, key, sys.argv[4])
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
