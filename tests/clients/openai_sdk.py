"""Drives kvsnap's Responses API through OpenAI's official Python SDK (installed by `make sdk`
under .cache/sdk) and prints what it saw as one JSON object; tests/clients.rs asserts on it.

    python3 tests/clients/openai_sdk.py tour URL KEY
    python3 tests/clients/openai_sdk.py other URL KEY RESPONSE_ID
    python3 tests/clients/openai_sdk.py turn URL KEY PREVIOUS_ID|- QUESTION
    python3 tests/clients/openai_sdk.py tools URL KEY GRAMMAR

`tour` tries every route and shape once; `other` tries to read and continue a response with
another key; `turn` sends one turn continuing PREVIOUS_ID (or none) and prints the response.
`tools` offers a tool through Chat Completions (the reply held to one call by GRAMMAR), reads
the call streamed and not, and sends its result back, as an agent does.
"""

import json
import sys

import openai

MODEL = "any"  # kvsnap serves one model, whatever a request names
INSTRUCTIONS = "You answer in one short sentence."


def client(url, key):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def status_error(call):
    """The SDK's exception for a refused request, as data."""
    try:
        call()
    except openai.APIStatusError as error:
        return {"class": type(error).__name__, "status": error.status_code, "message": error.message}
    return None


def create(c, **fields):
    return c.responses.create(
        model=MODEL, max_output_tokens=24, temperature=0, instructions=INSTRUCTIONS, **fields
    )


def tour(url, key):
    c = client(url, key)
    first = create(c, input=[{"role": "user", "content": "Name a colour."}])
    events, gathered, completed = [], "", None
    for event in create(c, input=[{"role": "user", "content": "Name a colour."}], stream=True):
        events.append(event.type)
        if event.type == "response.output_text.delta":
            gathered += event.delta
        if event.type in ("response.completed", "response.incomplete"):
            completed = event.response
    second = create(c, input="Name a fruit.", previous_response_id=first.id)
    read_back = c.responses.retrieve(second.id)
    transient = create(c, input="Name a tree.", store=False)
    transient_error = status_error(lambda: c.responses.retrieve(transient.id))
    c.responses.delete(second.id)
    return {
        "first": first.model_dump(),
        "first_text": first.output_text,
        "events": events,
        "gathered": gathered,
        "completed": completed.model_dump(),
        "completed_text": completed.output_text,
        "second": second.model_dump(),
        "second_text": second.output_text,
        "read_back": read_back.model_dump(),
        "read_back_text": read_back.output_text,
        "transient": transient.model_dump(),
        "transient_error": transient_error,
        "deleted_error": status_error(lambda: c.responses.retrieve(second.id)),
        "first_still": c.responses.retrieve(first.id).output_text,
        "unknown_previous_error": status_error(
            lambda: create(c, input="Hi.", previous_response_id="resp_" + "0" * 32)
        ),
    }


def other(url, key, response_id):
    c = client(url, key)
    return {
        "read": status_error(lambda: c.responses.retrieve(response_id)),
        "continued": status_error(
            lambda: create(c, input="Go on.", previous_response_id=response_id)
        ),
        "deleted": status_error(lambda: c.responses.delete(response_id)),
    }


def turn(url, key, previous, question):
    fields = {"input": question}
    if previous != "-":
        fields["previous_response_id"] = previous
    response = create(client(url, key), **fields)
    return {"id": response.id, "text": response.output_text, "usage": response.usage.model_dump()}


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def tools(url, key, grammar):
    c = client(url, key)
    question = [{"role": "user", "content": "What is the weather in Oslo?"}]
    fields = dict(model=MODEL, max_tokens=64, temperature=0, tools=[WEATHER], messages=question)
    made = c.chat.completions.create(**fields, extra_body={"grammar": grammar})
    with c.chat.completions.stream(**fields, extra_body={"grammar": grammar}) as stream:
        streamed = stream.get_final_completion()
    message = made.choices[0].message
    call = message.tool_calls[0]
    answered = c.chat.completions.create(
        model=MODEL,
        max_tokens=8,
        temperature=0,
        tools=[WEATHER],
        messages=question
        + [
            message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "4 C, rain"},
        ],
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
    elif command == "tools":
        result = tools(url, key, sys.argv[4])
    elif command == "other":
        result = other(url, key, sys.argv[4])
    elif command == "turn":
        result = turn(url, key, sys.argv[4], sys.argv[5])
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
