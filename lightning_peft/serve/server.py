"""``lightning-peft serve``: exported adapters behind HTTP, on LitServe.

LitServe owns the processes, the request queue and the dynamic batching: one inference worker holds the
:class:`~lightning_peft.serve.engine.AdapterEngine` (one frozen base, every adapter), and each batch LitServe
collects — requests for any adapters, hot loads and unloads in arrival order — is answered by one call of
:meth:`AdapterWorkerAPI.predict`. The public routes (``/predict``, ``/adapters``, ``/v1/chat/completions``,
``/metrics``) validate requests in the HTTP process and hand them to that worker through LitServe's queue.

    lightning-peft serve --adapters sentiment=runs/quickstart/export topics=runs/topics/export --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import secrets
import signal
import socket
import threading
import time
import uuid
from typing import Any

import litserve as ls
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from litserve.server import RegularRequestHandler
from starlette.middleware.base import BaseHTTPMiddleware

from lightning_peft.errors import LightningPeftError
from lightning_peft.serve.engine import MAX_NEW_TOKENS_LIMIT, AdapterEngine, InputError, unknown_adapter
from lightning_peft.serve.exports import AdapterRefused, ServedAdapter, read_adapter
from lightning_peft.serve.metrics import ServingMetrics

#: where LitServe queues work for the inference worker; only this server's routes may use it (see ``token``)
WORKER_PATH = "/_lightning_peft/worker"
API_KEY_ENV = "LIGHTNING_PEFT_API_KEY"
MAX_BODY_BYTES = 8 * 1024 * 1024
#: seconds a SIGTERM waits for requests in flight before the workers stop
DRAIN_TIMEOUT = 60.0


class AdapterWorkerAPI(ls.LitAPI):
    """LitServe's side of the server: one :class:`AdapterEngine` per inference worker, answering batches of
    ``predict``, ``load``, ``unload`` operations in their arrival order."""

    def __init__(self, adapters: dict[str, str], token: str, max_batch_size: int, batch_timeout: float,
                 in_flight: Any = None) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=WORKER_PATH)
        self.initial_adapters = adapters
        self.token = token
        self.in_flight = in_flight  # the HTTP side's count of requests not yet answered (shared memory)

    def setup(self, device: str) -> None:
        self.engine = AdapterEngine(device)
        for name, path in self.initial_adapters.items():
            self.engine.load(read_adapter(name, path))
        signal.signal(signal.SIGTERM, self.on_sigterm)

    def on_sigterm(self, *_: Any) -> None:
        """A SIGTERM sent to every process of the server (systemd's stop) reaches this worker too: while requests
        are in flight it keeps answering (the main process drains them, then stops the worker with another SIGTERM);
        with none, it stops now."""
        if self.in_flight is not None and self.in_flight.value > 0:
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    def decode_request(self, request: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(request, dict) or request.get("token") != self.token:
            return {"op": "refused"}
        return request

    def batch(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return inputs

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def predict(self, batch: list[dict[str, Any]] | dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        if isinstance(batch, dict):  # max_batch_size 1: LitServe passes the request itself
            return self.answer([batch])[0]
        return self.answer(batch)

    def answer(self, operations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answers in order; consecutive ``predict`` operations run together (mixed adapters, one pass)."""
        answers: list[dict[str, Any]] = [{} for _ in operations]
        pending: list[int] = []
        for index, operation in enumerate([*operations, {"op": "end"}]):
            if operation.get("op") == "predict":
                pending.append(index)
                continue
            if pending:
                requests = [(operations[i]["adapter"], operations[i]["inputs"], operations[i].get("parameters") or {})
                            for i in pending]
                for i, result in zip(pending, self.engine.predict(requests), strict=True):
                    answers[i] = error_body(result) if isinstance(result, InputError) else {"outputs": result}
                pending = []
            if index < len(operations):
                answers[index] = self.manage(operation)
        return answers

    def manage(self, operation: dict[str, Any]) -> dict[str, Any]:
        try:
            if operation["op"] == "load":
                self.engine.load(read_adapter(operation["name"], operation["path"]))
                return {"adapter": self.engine.adapters[operation["name"]].describe()}
            if operation["op"] == "unload":
                return {"adapter": self.engine.unload(operation["name"]).describe()}
        except AdapterRefused as err:
            return error_body(refused(err))
        except KeyError:
            return error_body(unknown_adapter("name", operation.get("name")))
        return error_body(InputError("request", "not a request of this server", 404))

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def error_body(err: InputError) -> dict[str, Any]:
    """An error as every route answers it (OpenAI's shape): ``{"error": {"message", "field", "type"}}``."""
    return {"status": err.status,
            "error": {"message": str(err), "field": err.field,
                      "type": "invalid_request_error" if err.status < 500 else "server_error"}}


def refused(err: AdapterRefused) -> InputError:
    """A refused adapter as a 422 naming its field (the message starts with ``path:`` or ``name:``)."""
    field, _, message = str(err).partition(": ")
    return InputError(field, message, 422)


def respond(body: dict[str, Any], status: int = 200) -> JSONResponse:
    status = body.pop("status", status)
    return JSONResponse(body, status_code=status)


class ApiKeyMiddleware(BaseHTTPMiddleware):
    """401 for every request without ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""

    def __init__(self, app: Any, api_key: str) -> None:
        super().__init__(app)
        self.api_key = api_key

    async def dispatch(self, request: Request, call_next: Any) -> Any:
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not secrets.compare_digest(given.encode(), self.api_key.encode()):
            return respond(error_body(InputError("api_key", "missing or wrong API key; send 'Authorization: "
                                                 "Bearer <key>' or 'X-API-Key: <key>'", 401)))
        return await call_next(request)


class AdapterServer:
    """The HTTP side: LitServe with this package's routes, the serving set as the routes know it, the counters.

    Example::

        server = AdapterServer([read_adapter("sentiment", "runs/quickstart/export")], port=8000)
        server.run()  # until SIGTERM / Ctrl-C
    """

    def __init__(self, adapters: list[ServedAdapter], host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, max_batch_size: int = 32, batch_timeout: float = 0.005,
                 max_inputs: int = 64, accelerator: str = "auto") -> None:
        check_shared_base(adapters)
        self.adapters = {adapter.name: adapter for adapter in adapters}
        self.host, self.port, self.max_inputs = host, port, max_inputs
        self.metrics = ServingMetrics()
        # LitServe spawns its inference worker, which reads this count: a lock made for fork could not go there
        self.in_flight = mp.get_context("spawn").Value("i", 0)
        self.draining = mp.Value("b", 0)
        self.api = AdapterWorkerAPI({a.name: str(a.directory) for a in adapters}, secrets.token_hex(16),
                                    max_batch_size, batch_timeout, self.in_flight)
        middlewares = [(ApiKeyMiddleware, {"api_key": api_key})] if api_key else []
        self.litserver = ls.LitServer(self.api, accelerator=accelerator, devices=1, workers_per_device=1,
                                      timeout=False, middlewares=middlewares)
        self.add_routes(self.litserver.app)

    # -- HTTP routes ------------------------------------------------------------------------------------
    def add_routes(self, app: FastAPI) -> None:
        app.add_api_route("/predict", self.predict, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/adapters", self.list_adapters, methods=["GET"])
        app.add_api_route("/adapters", self.load_adapter, methods=["POST"])
        app.add_api_route("/adapters/{name}", self.unload_adapter, methods=["DELETE"])
        app.add_api_route("/metrics", self.prometheus, methods=["GET"])

    async def predict(self, request: Request) -> JSONResponse:
        """``{"adapter": name, "inputs": [...], "parameters": {...}}`` → ``{"adapter", "outputs": [...]}``."""
        return await self._answered(request, self._predict_operation, lambda body, answer: {
            "adapter": body["adapter"], "outputs": answer["outputs"]})

    async def chat_completions(self, request: Request) -> JSONResponse:
        """OpenAI's chat completions (no streaming) for a decoder adapter named by ``model``."""
        def reply(body: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
            content = answer["outputs"][0]["prediction"]
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                    "model": body["model"], "choices": [{"index": 0, "finish_reason": "stop",
                                                         "message": {"role": "assistant", "content": content}}]}
        return await self._answered(request, self._chat_operation, reply, fields={"inputs[0]": "messages"})

    async def list_adapters(self) -> JSONResponse:
        return JSONResponse({"adapters": [adapter.describe() for adapter in self.adapters.values()]})

    async def load_adapter(self, request: Request) -> JSONResponse:
        """``{"name": name, "path": export}``: checked here, loaded by the worker; the set is unchanged on error."""
        checked: list[ServedAdapter] = []  # the adapter read here, added to the serving set once the worker has it

        def operation(body: dict[str, Any]) -> dict[str, Any]:
            expect_fields(body, {"name": str, "path": str}, required=("name", "path"))
            if body["name"] in self.adapters:
                raise InputError("name", f"an adapter named {body['name']!r} is already served; DELETE "
                                         f"/adapters/{body['name']} first or choose another name", 409)
            try:
                checked.append(read_adapter(body["name"], body["path"]))
                check_shared_base([*self.adapters.values(), checked[0]])
            except AdapterRefused as err:
                raise refused(err) from err
            return {"op": "load", "name": checked[0].name, "path": str(checked[0].directory)}

        def loaded(body: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
            self.adapters[body["name"]] = checked[0]
            return {"status": 201, **answer}

        return await self._answered(request, operation, loaded)

    async def unload_adapter(self, name: str) -> JSONResponse:
        if name not in self.adapters:
            return respond(error_body(unknown_adapter("name", name)))
        answer = await self._submit({"op": "unload", "name": name})
        if "error" not in answer:
            self.adapters.pop(name, None)
        return respond(answer)

    async def prometheus(self) -> PlainTextResponse:
        return PlainTextResponse(self.metrics.prometheus(), media_type="text/plain; version=0.0.4")

    # -- request handling -------------------------------------------------------------------------------
    def _predict_operation(self, body: dict[str, Any]) -> dict[str, Any]:
        expect_fields(body, {"adapter": str, "inputs": list, "parameters": dict}, required=("adapter", "inputs"))
        self._check_inputs(body["adapter"], body["inputs"])
        return {"op": "predict", "adapter": body["adapter"], "inputs": body["inputs"],
                "parameters": generation_parameters(body.get("parameters") or {}, PREDICT_PARAMETER_FIELDS)}

    def _chat_operation(self, body: dict[str, Any]) -> dict[str, Any]:
        expect_fields(body, {"model": str, "messages": list, "max_tokens": int, "temperature": (int, float),
                             "stream": bool, "n": int}, required=("model", "messages"))
        if body.get("stream"):
            raise InputError("stream", "streaming is not supported; send stream: false")
        if body.get("n", 1) != 1:
            raise InputError("n", "one choice per request; send n: 1")
        self._check_inputs(body["model"], [body["messages"]], field="model")
        if self.adapters[body["model"]].task != "causal_lm":
            raise InputError("model", f"{body['model']!r} is a {self.adapters[body['model']].task} adapter; chat "
                                      "completions need a causal_lm (decoder) adapter; use POST /predict")
        parameters = {"max_new_tokens": body.get("max_tokens"), "temperature": body.get("temperature")}
        return {"op": "predict", "adapter": body["model"], "inputs": [body["messages"]],
                "parameters": generation_parameters({k: v for k, v in parameters.items() if v is not None},
                                                    CHAT_PARAMETER_FIELDS)}

    def _check_inputs(self, adapter: str, inputs: list[Any], field: str = "adapter") -> None:
        if adapter not in self.adapters:
            raise unknown_adapter(field, adapter, list(self.adapters))
        if not inputs:
            raise InputError("inputs", "is empty; give at least one input")
        if len(inputs) > self.max_inputs:
            raise InputError("inputs", f"holds {len(inputs)} inputs; send at most {self.max_inputs} per request",
                             413)

    async def _answered(self, request: Request, operation: Any, reply: Any,
                        fields: dict[str, str] | None = None) -> JSONResponse:
        """Parse and check the body, submit ``operation(body)`` to the worker, answer ``reply(body, answer)``;
        ``fields`` renames the worker's field names to the route's (``inputs[0]`` is a chat's ``messages``)."""
        started = time.perf_counter()
        adapter = None
        with self.in_flight.get_lock():
            self.in_flight.value += 1
        try:
            if self.draining.value:
                raise InputError("server", "shutting down; retry on another replica", 503)
            body = await read_json(request)
            adapter = body.get("adapter") or body.get("model") or body.get("name")
            answer = await self._submit(await asyncio.to_thread(operation, body))
            if "error" in answer:
                field = answer["error"]["field"]
                answer["error"]["field"] = (fields or {}).get(field, field)
            response = respond(answer) if "error" in answer else respond(reply(body, answer))
        except InputError as err:
            response = respond(error_body(err))
        finally:
            with self.in_flight.get_lock():
                self.in_flight.value -= 1
        if isinstance(adapter, str) and request.url.path != "/adapters":
            self.metrics.observe(adapter if adapter in self.adapters else None, time.perf_counter() - started,
                                 ok=response.status_code < 400)
        return response

    async def _submit(self, operation: dict[str, Any]) -> dict[str, Any]:
        handler = RegularRequestHandler(self.api, self.litserver)
        try:
            return await handler.handle_request({**operation, "token": self.api.token}, dict)
        except Exception as err:  # the worker failed on this batch; the server itself keeps serving
            return error_body(InputError("server", f"the model worker failed ({type(err).__name__}); see the "
                                                   "server log", 500))

    # -- process ----------------------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until SIGTERM or Ctrl-C; SIGTERM first lets requests in flight finish (new ones get 503)."""
        owner = os.getpid()

        def on_sigterm(*_: Any) -> None:
            # LitServe's forked processes inherit this handler. A SIGTERM sent to the whole process group (systemd's
            # default) reaches them too: only this process drains; the others are stopped by its shutdown, and the
            # multiprocessing manager (forked before the shutdown event existed) must outlive the drain it serves.
            if os.getpid() == owner:
                threading.Thread(target=self._drain, daemon=True).start()

        signal.signal(signal.SIGTERM, on_sigterm)
        self.litserver.run(host=self.host, port=self.port, num_api_servers=1, generate_client_file=False,
                           api_server_worker_type="process", log_level="warning")

    def _drain(self) -> None:
        self.draining.value = 1
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while self.in_flight.value > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.litserver._shutdown_event.set()


def expect_fields(body: dict[str, Any], types: dict[str, Any], required: tuple[str, ...], prefix: str = "") -> None:
    """:class:`InputError` for a missing required field, an unknown field or a value of the wrong type; ``prefix``
    names where ``body`` sits in the request (``parameters.``)."""
    for name in required:
        if name not in body:
            raise InputError(prefix + name, f"missing; send {{{', '.join(repr(r) for r in required)}}}")
    for name, value in body.items():
        if name not in types:
            raise InputError(prefix + name, f"not a field of this request; the fields are {', '.join(types)}")
        if not isinstance(value, types[name]) or (isinstance(value, bool) and types[name] is not bool):
            expected = types[name].__name__ if isinstance(types[name], type) else "number"
            raise InputError(prefix + name, f"must be a {expected}, got {type(value).__name__}")


#: where the generation parameters sit in each route's request, for the errors that name them
PREDICT_PARAMETER_FIELDS = {"max_new_tokens": "parameters.max_new_tokens", "temperature": "parameters.temperature"}
CHAT_PARAMETER_FIELDS = {"max_new_tokens": "max_tokens", "temperature": "temperature"}


def generation_parameters(parameters: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    """Checked ``max_new_tokens`` (1 … :data:`MAX_NEW_TOKENS_LIMIT`) and ``temperature`` (≥ 0; 0: greedy); errors
    name the request's own ``fields``."""
    expect_fields(parameters, {"max_new_tokens": int, "temperature": (int, float)}, required=(), prefix="parameters.")
    limit = parameters.get("max_new_tokens", 1)
    if not 1 <= limit <= MAX_NEW_TOKENS_LIMIT:
        raise InputError(fields["max_new_tokens"], f"must be between 1 and {MAX_NEW_TOKENS_LIMIT}, got {limit}")
    if parameters.get("temperature", 0) < 0:
        raise InputError(fields["temperature"], "must be ≥ 0 (0: greedy decoding)")
    return parameters


async def read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise InputError("body", f"is {len(raw)} bytes; send at most {MAX_BODY_BYTES}", 413)
    try:
        body = json.loads(raw)
    except ValueError as err:
        raise InputError("body", f"is not valid JSON ({err}); send a JSON object", 400) from err
    if not isinstance(body, dict):
        raise InputError("body", f"must be a JSON object, got {type(body).__name__}", 400)
    return body


def check_shared_base(adapters: list[ServedAdapter]) -> None:
    """:class:`AdapterRefused` unless every adapter was trained on the same base model (compressed exports, whole
    models of their own, are not compared)."""
    adapters = [adapter for adapter in adapters if not adapter.standalone]  # compressed exports bring their own
    first = adapters[0].base_identity if adapters else None
    odd = next((a for a in adapters if a.base_identity != first), None)
    if odd is not None:
        raise AdapterRefused(f"path: {str(odd.directory)!r} (adapter {odd.name!r}) was trained on "
                             f"{odd.base_identity!r} but {adapters[0].name!r} on {first!r}; one server serves "
                             "adapters of one base")


def check_port(host: str, port: int) -> None:
    """:class:`LightningPeftError` for a port LitServe refuses (below 1024) or one already in use, before any
    model is loaded."""
    if not 1024 <= port <= 65535:
        raise LightningPeftError(f"--port: {port} is outside 1024-65535; choose a port in that range")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise LightningPeftError(f"--port: {host}:{port} cannot be bound ({err.strerror}); stop what uses it or "
                                     "choose another port") from err


def parse_adapters(values: list[str]) -> list[ServedAdapter]:
    """``name=path`` pairs (``--adapters``) read and checked."""
    adapters = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise LightningPeftError(f"--adapters: {value!r} is not NAME=PATH; e.g. sentiment=runs/quickstart/export")
        if any(a.name == name for a in adapters):
            raise LightningPeftError(f"--adapters: the name {name!r} is given twice; give each adapter its own name")
        try:
            adapters.append(read_adapter(name, path))
        except AdapterRefused as err:
            raise LightningPeftError(f"--adapters {name}: {err}") from err
    return adapters


def serve_main(argv: list[str]) -> None:
    """``lightning-peft serve --adapters NAME=PATH [NAME=PATH …] [--port 8000] [--host 127.0.0.1] [--api_key K]``."""
    parser = argparse.ArgumentParser(prog="lightning-peft serve", exit_on_error=False,
                                     description="Serve exported adapters on one frozen base over HTTP (LitServe).")
    parser.add_argument("--adapters", nargs="+", required=True, metavar="NAME=PATH",
                        help="exports to serve (a directory written by `lightning-peft export`, or its adapter/)")
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"],
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="1024-65535")
    parser.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                        help=f"require this key on every request (default: ${API_KEY_ENV})")
    parser.add_argument("--max_batch_size", type=int, default=32, help="requests LitServe batches together")
    parser.add_argument("--batch_timeout", type=float, default=0.005, help="seconds LitServe waits to fill a batch")
    parser.add_argument("--max_inputs", type=int, default=64, help="inputs one request may carry")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    args = parser.parse_args(argv)
    adapters = parse_adapters(args.adapters)
    try:
        check_shared_base(adapters)
    except AdapterRefused as err:
        raise LightningPeftError(f"--adapters: {str(err).split(': ', 1)[-1]}") from err
    if args.max_batch_size < 1 or args.max_inputs < 1:
        raise LightningPeftError("--max_batch_size and --max_inputs must be at least 1")
    check_port(args.host, args.port)
    server = AdapterServer(adapters, host=args.host, port=args.port, api_key=args.api_key,
                           max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout,
                           max_inputs=args.max_inputs, accelerator=args.accelerator)
    print(f"serving {', '.join(server.adapters)} on http://{args.host}:{args.port}", flush=True)
    server.run()
