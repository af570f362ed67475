"""A decoder (chat) adapter served: /predict and OpenAI's /v1/chat/completions equal `lightning-peft predict`;
SIGTERM, to the server or to its process group, lets a request in flight finish."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.serve.conftest import Server


@pytest.fixture(scope="module")
def chat_server(served_chat):
    server = Server("--adapters", f"chat={served_chat['export']}")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_generation_equals_predict_on_both_routes(chat_server, served_chat):
    records = served_chat["predictions"]
    status, body = chat_server.call("POST", "/predict", {"adapter": "chat",
                                                         "inputs": [r["messages"] for r in records]})
    assert status == 200, body
    assert body["outputs"] == records
    status, body = chat_server.call("POST", "/predict", {"adapter": "chat",
                                                         "inputs": [records[0]["messages"][0]["content"]]})
    assert body["outputs"] == records[:1]  # a string is one user turn
    status, completion = chat_server.call("POST", "/v1/chat/completions",
                                          {"model": "chat", "messages": records[1]["messages"]})
    assert status == 200, completion
    assert completion["object"] == "chat.completion" and completion["model"] == "chat"
    assert completion["choices"][0]["message"] == {"role": "assistant", "content": records[1]["prediction"]}


@pytest.mark.parametrize("body, field", [
    ({"model": "chat", "messages": [{"role": "user"}]}, "messages"),
    ({"model": "chat", "messages": "hi"}, "messages"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}, "stream"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "max_tokens"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, "model"),
])
def test_bad_chat_requests_name_the_field(chat_server, body, field):
    status, answer = chat_server.call("POST", "/v1/chat/completions", body)
    assert 400 <= status < 500 and answer["error"]["field"] == field, answer


def test_sigterm_finishes_the_request_in_flight(chat_server):
    """Last in this module: it stops the module's server. The signal goes to the whole process group, as systemd
    sends it: the main process drains, and LitServe's forked and spawned processes must not cut the request short
    (the main process alone getting it, as from `docker stop`, is the easier half of this case)."""
    server = chat_server
    answers = []
    long_request = {"adapter": "chat", "inputs": ["translate: good"] * 8, "parameters": {"max_new_tokens": 400}}
    thread = threading.Thread(target=lambda: answers.append(server.call("POST", "/predict", long_request)))
    thread.start()
    time.sleep(0.5)  # the request is in flight (queued or in the worker: either way it must be answered)
    os.killpg(server.process.pid, signal.SIGTERM)
    assert server.process.wait(60) == 0
    thread.join()
    assert answers[0][0] == 200 and len(answers[0][1]["outputs"]) == 8
    assert "Traceback" not in server.process.stdout.read()
