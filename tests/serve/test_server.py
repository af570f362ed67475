"""``lightning-peft serve`` as a real process on 127.0.0.1: answers equal to ``lightning-peft predict``, bad input,
hot load / unload under concurrent requests, the API key, SIGTERM."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from lightning_peft.cli import main


def assert_same_records(served: list[dict], predicted: list[dict]) -> None:
    """Equal records; probabilities and entropies to float tolerance (other batch neighbours, other padding)."""
    assert len(served) == len(predicted)
    for mine, theirs in zip(served, predicted, strict=True):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            if key == "probabilities" or isinstance(value, float):
                assert mine[key] == pytest.approx(value, abs=1e-5)
            else:
                assert mine[key] == value, key


def inputs_of(name: str, run: dict) -> list:
    if name == "ner":
        return [" ".join(record["words"]) for record in run["predictions"]]
    return [record["text"] for record in run["predictions"]]


def test_concurrent_requests_for_different_adapters_equal_predict(server, served):
    jobs = [(name, inputs) for name, run in served.items() for inputs in [inputs_of(name, run)]] * 4
    with ThreadPoolExecutor(len(jobs)) as pool:  # together: LitServe batches them, adapters mixed
        answers = list(pool.map(lambda job: server.call("POST", "/predict", {"adapter": job[0], "inputs": job[1]}),
                                jobs))
    for (name, _), (status, body) in zip(jobs, answers, strict=True):
        assert status == 200, body
        assert body["adapter"] == name
        assert_same_records(body["outputs"], served[name]["predictions"])
    status, listing = server.call("GET", "/adapters")
    assert status == 200
    facts = {adapter["name"]: adapter for adapter in listing["adapters"]}
    assert facts["sentiment"]["labels"] == ["neg", "pos"] and facts["ner"]["task"] == "token_classification"
    assert {adapter["method"] for adapter in facts.values()} == {"LORA"}
    status, metrics = server.call("GET", "/metrics")
    assert 'lightning_peft_requests_total{adapter="sentiment"} 4' in metrics
    assert 'lightning_peft_latency_seconds{adapter="ner",quantile="0.99"}' in metrics


def test_words_may_be_given_as_a_list(server, served):
    record = served["ner"]["predictions"][0]
    status, body = server.call("POST", "/predict", {"adapter": "ner", "inputs": [record["words"]]})
    assert status == 200 and body["outputs"] == [record]


BAD_REQUESTS = [
    # (body or raw bytes, status, field named, words of the fix)
    (b"{not json", 400, "body", "valid JSON"),
    (b"[1, 2]", 400, "body", "JSON object"),
    ({"inputs": ["good"]}, 422, "adapter", "missing"),
    ({"adapter": "sentiment"}, 422, "inputs", "missing"),
    ({"adapter": "sentiment", "inputs": "good"}, 422, "inputs", "must be a list"),
    ({"adapter": 3, "inputs": ["good"]}, 422, "adapter", "must be a str"),
    ({"adapter": "sentiment", "inputs": ["good"], "top_k": 2}, 422, "top_k", "not a field"),
    ({"adapter": "nope", "inputs": ["good"]}, 404, "adapter", "GET /adapters"),
    ({"adapter": "sentiment", "inputs": []}, 422, "inputs", "at least one"),
    ({"adapter": "sentiment", "inputs": ["good"] * 9}, 413, "inputs", "at most 8"),
    ({"adapter": "sentiment", "inputs": ["good", 5]}, 422, "inputs[1]", "non-empty string"),
    ({"adapter": "sentiment", "inputs": ["   "]}, 422, "inputs[0]", "non-empty string"),
    ({"adapter": "ner", "inputs": [[]]}, 422, "inputs[0]", "list of words"),
    ({"adapter": "sentiment", "inputs": ["good " * 200]}, 413, "inputs[0]", "at most 128"),
    ({"adapter": "sentiment", "inputs": ["good"], "parameters": {"max_new_tokens": 0}}, 422,
     "parameters.max_new_tokens", "between 1"),
    ({"adapter": "sentiment", "inputs": ["good"], "parameters": {"top_p": 0.9}}, 422, "parameters.top_p",
     "not a field"),
    ({"adapter": "sentiment", "inputs": ["good"], "parameters": {"temperature": "hot"}}, 422,
     "parameters.temperature", "must be a number"),
]


@pytest.mark.parametrize("body, status, field, fix", BAD_REQUESTS)
def test_bad_input_is_a_4xx_naming_the_field(server, body, status, field, fix):
    raw = body if isinstance(body, bytes) else None
    got, answer = server.call("POST", "/predict", None if raw else body, raw=raw)
    assert got == status, answer
    assert answer["error"]["field"] == field and fix in answer["error"]["message"], answer
    assert server.call("POST", "/predict", {"adapter": "sentiment", "inputs": ["good"]})[0] == 200  # still serving


def corrupt_copies(export, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(export, truncated)
    weights = truncated / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    other_base = tmp_path / "other-base"
    shutil.copytree(export, other_base)
    config_file = other_base / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = "some-org/another-model"
    config_file.write_text(json.dumps(config))
    wrong_shape = tmp_path / "wrong-shape"
    shutil.copytree(export, wrong_shape)
    config_file = wrong_shape / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["r"] = 3  # the weights are rank 4: peft cannot load them
    config_file.write_text(json.dumps(config))
    return {"truncated": truncated, "other_base": other_base, "wrong_shape": wrong_shape}


def test_hot_load_and_unload_under_concurrent_requests(server, served, tmp_path):
    stop = threading.Event()
    answers = []

    def keep_asking():
        while not stop.is_set():
            answers.append(server.call("POST", "/predict", {"adapter": "sentiment",
                                                            "inputs": inputs_of("sentiment", served["sentiment"])}))

    threads = [threading.Thread(target=keep_asking) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        status, body = server.call("POST", "/adapters", {"name": "sentiment_c",
                                                         "path": str(served["sentiment_b"]["export"])})
        assert status == 201 and body["adapter"]["name"] == "sentiment_c", body
        status, body = server.call("POST", "/predict", {"adapter": "sentiment_c",
                                                        "inputs": inputs_of("sentiment", served["sentiment_b"])})
        assert status == 200
        assert_same_records(body["outputs"], served["sentiment_b"]["predictions"])
        status, body = server.call("POST", "/adapters", {"name": "sentiment_c", "path": str(served["ner"]["export"])})
        assert status == 409 and body["error"]["field"] == "name"
        for name, path in corrupt_copies(served["sentiment"]["export"], tmp_path).items():
            status, body = server.call("POST", "/adapters", {"name": name, "path": str(path)})
            assert status == 422 and body["error"]["field"] == "path", (name, body)
        status, body = server.call("POST", "/adapters", {"name": "missing", "path": str(tmp_path / "nothing")})
        assert status == 422 and "not an exported adapter" in body["error"]["message"]
        assert server.call("DELETE", "/adapters/sentiment_c")[0] == 200
        status, body = server.call("POST", "/predict", {"adapter": "sentiment_c", "inputs": ["good"]})
        assert status == 404
        assert server.call("DELETE", "/adapters/sentiment_c")[0] == 404
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    names = [adapter["name"] for adapter in server.call("GET", "/adapters")[1]["adapters"]]
    assert names == ["sentiment", "sentiment_b", "ner"]  # the serving set as it was
    assert answers and all(status == 200 for status, _ in answers)
    for _, body in answers:
        assert_same_records(body["outputs"], served["sentiment"]["predictions"])  # never another request's output


def test_compressed_exports_are_served_beside_the_adapters(server, served, fitted, tmp_path):
    export = tmp_path / "export"
    main(["export", "--config", str(fitted["config"]), "--ckpt_path", "best", "--export_dir", str(export),
          "--quantize", "int8", "--onnx", "true"])  # the checkpoint `sentiment` was exported from
    compressed = {"sentiment_int8": (export / "int8", "INT8", 2e-2), "sentiment_onnx": (export / "onnx", "ONNX", 1e-5),
                  "sentiment_onnx_int8": (export / "onnx" / "model_quantized.onnx", "ONNX", 2e-2)}
    try:
        for name, (path, method, tolerance) in compressed.items():
            status, body = server.call("POST", "/adapters", {"name": name, "path": str(path)})
            assert status == 201 and body["adapter"]["method"] == method, body
            status, body = server.call("POST", "/predict", {"adapter": name,
                                                            "inputs": inputs_of("sentiment", served["sentiment"])})
            assert status == 200, body
            for mine, theirs in zip(body["outputs"], served["sentiment"]["predictions"], strict=True):
                assert mine["probabilities"] == pytest.approx(theirs["probabilities"], abs=tolerance), name
    finally:
        for name in compressed:
            server.call("DELETE", f"/adapters/{name}")
    names = [adapter["name"] for adapter in server.call("GET", "/adapters")[1]["adapters"]]
    assert names == ["sentiment", "sentiment_b", "ner"]


def test_the_api_key_guards_every_route(server):
    request = {"adapter": "sentiment", "inputs": ["good"]}
    for method, path, body in [("POST", "/predict", request), ("GET", "/adapters", None), ("GET", "/metrics", None),
                               ("GET", "/health", None), ("DELETE", "/adapters/sentiment", None),
                               ("POST", "/v1/chat/completions", {"model": "sentiment", "messages": []})]:
        status, answer = server.call(method, path, body, headers={})
        assert status == 401 and answer["error"]["field"] == "api_key", (path, answer)
        assert server.call(method, path, body, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert server.call("POST", "/predict", request, headers={"X-API-Key": "s3cret"})[0] == 200
    assert server.call("GET", "/adapters")[1]["adapters"][0]["name"] == "sentiment"  # nothing was unloaded


def test_serve_refuses_bad_arguments_before_starting(server, served, tmp_path, capsys):
    from lightning_peft.cli import main

    sentiment, other_base = served["sentiment"]["export"], corrupt_copies(served["sentiment"]["export"], tmp_path)
    cases = [
        (["nothing-here"], "is not NAME=PATH"),
        ([f"a={tmp_path / 'missing'}"], "--adapters a: path:"),
        ([f"a={sentiment}", f"a={served['ner']['export']}"], "given twice"),
        ([f"a={sentiment}", f"b={other_base['other_base']}"], "one server serves adapters of one base"),
        ([f"a={sentiment}", "--port", "80"], "--port: 80 is outside 1024-65535"),
        ([f"a={sentiment}", "--port", str(server.port)], f"--port: 127.0.0.1:{server.port} cannot be bound"),
        ([f"a={sentiment}", "--host", "10.1.2.3"], "argument --host: invalid choice"),
    ]
    for adapters, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", "--adapters", *adapters])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
