"""Serving many adapters: ``lightning-peft serve`` vs one merged model (the ceiling) and a hand-written server that
switches adapters per request, all on LitServe with the same HTTP stack.

    python benchmarks/serving.py --json benchmarks/results/serving.json

Setting: the packaged MiniLM-L6 encoder, n = 1, 8 and 64 sequence-classification adapters (LoRA r=8 alpha 16 on
query/value, each with its own 2-label head; random-init weights — speed does not depend on them), one SST-2 dev
sentence per request, requests spread evenly over the adapters, ``--clients`` concurrent clients on 127.0.0.1 with
keep-alive connections, ``--requests`` requests per run (``--time-cap`` seconds at most). Server, worker and
clients share this machine's cores.

Runs: ``lightning_peft_<n>`` (``lightning-peft serve``: LitServe batches up to 32 requests, 5 ms wait; a batch
mixing adapters is one forward pass), ``switching_<n>`` (one ``PeftModel`` holding the n adapters, ``set_adapter``
then a forward per request: what a user writes by hand) and ``single_merged`` (one adapter merged into its base,
LitServe batching as ours: the ceiling). Each server is a fresh process; a warm-up precedes the measurement.
Then, in process and without HTTP, ``engine_gathered_64`` vs ``engine_peft_routing_64``: the engine's rows/s on
32-row batches over 64 adapters with each row's LoRA update gathered vs peft's ``adapter_names`` split.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, default_model, write_json  # noqa: E402

ADAPTER_COUNTS = (1, 8, 64)
RUNS = ("single_merged", *(f"{kind}_{n}" for n in ADAPTER_COUNTS for kind in ("lightning_peft", "switching")))
MAX_BATCH_SIZE, BATCH_TIMEOUT = 32, 0.005


def write_adapters(model_dir: str, directory: Path, count: int) -> list[Path]:
    """``count`` random-init LoRA classification adapters saved as ``lightning-peft export`` lays them out."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    labels = {"num_labels": 2, "id2label": {0: "negative", 1: "positive"},
              "label2id": {"negative": 0, "positive": 1}, "problem_type": "single_label_classification"}
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, **labels)
        model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                target_modules=["query", "value"]))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.02)  # a trained adapter's B is not zero
        adapter_dir = directory / f"adapter-{i}" / "adapter"
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        (adapter_dir / "labels.json").write_text(json.dumps(labels))
        paths.append(adapter_dir.parent)
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], port: int, timeout: float = 600.0) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read()[-3000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server did not start")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then whatever of the server's process group is left (its workers must not load the next run)."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def load(port: int, path: str, bodies: list[dict[str, Any]], clients: int, time_cap: float) -> dict[str, Any]:
    """Send ``bodies`` from ``clients`` threads (keep-alive connections); requests/s, p50/p99 latency, errors."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    cursor = iter(range(len(bodies)))
    deadline = time.monotonic() + time_cap

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < deadline:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            started = time.perf_counter()
            try:
                connection.request("POST", path, json.dumps(bodies[index]), {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                ok = False
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                latencies.append(time.perf_counter() - started)
                errors[0] += not ok

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    values = np.array(latencies) * 1000
    return {"requests": len(latencies), "requests_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99)), "errors": errors[0]}


def sentences(data_dir: Path, count: int) -> list[str]:
    with open(data_dir / "dev.tsv", newline="") as handle:
        rows = [row["sentence"].strip() for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return [rows[i % len(rows)] for i in range(count)]


def run(name: str, adapters: list[Path], texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    count = 1 if name == "single_merged" else int(name.rsplit("_", 1)[1])
    chosen = adapters[:count]
    if name.startswith("lightning_peft"):
        command = [sys.executable, "-m", "lightning_peft.cli", "serve", "--port", str(port), "--max_batch_size",
                   str(MAX_BATCH_SIZE), "--batch_timeout", str(BATCH_TIMEOUT), "--accelerator", "cpu",
                   "--adapters", *(f"a{i}={path}" for i, path in enumerate(chosen))]
    else:
        command = [sys.executable, str(Path(__file__).with_name("serving_baselines.py")),
                   "merged" if name == "single_merged" else "switching", str(port),
                   *(str(path / "adapter") for path in chosen)]
    bodies = [{"adapter": f"a{i % count}", "inputs": [text]} for i, text in enumerate(texts)]
    process = start(command, port)
    try:
        load(port, "/predict", bodies[: args.clients * 2], args.clients, args.time_cap)  # warm-up
        record = load(port, "/predict", bodies, args.clients, args.time_cap)
    finally:
        stop(process)
    record["adapters"] = count
    print(f"{name:<20}{record['requests_per_s']:>10.1f}{record['p50_ms']:>10.1f}{record['p99_ms']:>10.1f}"
          f"{record['errors']:>8}", flush=True)
    return record


def routing_runs(adapters: list[Path], texts: list[str]) -> dict[str, dict[str, Any]]:
    """In process, without HTTP: rows/s of the engine on 32-row batches spread over the adapters, each row's LoRA
    update gathered (ours) and peft's ``adapter_names`` split (GatheredLora switched off)."""
    from lightning_peft.serve import AdapterEngine, read_adapter
    from lightning_peft.serve.gathered_lora import GatheredLora

    engine = AdapterEngine()
    for i, path in enumerate(adapters):
        engine.load(read_adapter(f"a{i}", path))
    requests = [(f"a{i % len(adapters)}", [text], {}) for i, text in enumerate(texts[:320])]
    results = {}
    for name, routing in ((f"engine_gathered_{len(adapters)}", contextlib.nullcontext()),
                          (f"engine_peft_routing_{len(adapters)}", mock.patch.object(GatheredLora, "of",
                                                                                     return_value=None))):
        engine._gathered.clear()
        with routing:
            engine.predict(requests[:32])  # warm-up
            started = time.perf_counter()
            for k in range(0, len(requests), 32):
                engine.predict(requests[k:k + 32])
        results[name] = {"rows_per_s": len(requests) / (time.perf_counter() - started), "adapters": len(adapters)}
        print(f"{name:<26}{results[name]['rows_per_s']:>8.1f} rows/s (in process, batches of 32)", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "sst2")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--model", default=None, help="model directory (default: packaged MiniLM)")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--requests", type=int, default=960, help="requests per run")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--time-cap", type=float, default=120.0, help="seconds per run at most")
    parser.add_argument("--skip-routing", action="store_true", help="skip the in-process routing comparison")
    args = parser.parse_args()
    model_dir = args.model or default_model()
    texts = sentences(args.data_dir, args.requests)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = write_adapters(model_dir, Path(tmp), max(ADAPTER_COUNTS))
        print(f"{'run':<20}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
        for name in args.runs:
            results[name] = run(name, adapters, texts, args)
        if not args.skip_routing:
            results.update(routing_runs(adapters, texts))
    ceiling = results.get("single_merged", {}).get("requests_per_s")
    for n in ADAPTER_COUNTS:
        ours, switching = results.get(f"lightning_peft_{n}"), results.get(f"switching_{n}")
        if ours and ceiling:
            ours["vs_single_merged"] = ours["requests_per_s"] / ceiling
        if ours and switching:
            ours["vs_switching"] = ours["requests_per_s"] / switching["requests_per_s"]
        if ours:
            print(f"{n:>3} adapters: {ours.get('vs_single_merged', float('nan')):.2f}x single_merged, "
                  f"{ours.get('vs_switching', float('nan')):.2f}x switching")
    model_name = "packaged MiniLM-L6" if args.model is None else Path(model_dir).name
    write_json(args.json, results, {"model": model_name, "requests": args.requests, "clients": args.clients,
                                    "max_batch_size": MAX_BATCH_SIZE, "batch_timeout_s": BATCH_TIMEOUT,
                                    "cores": os.cpu_count()})


if __name__ == "__main__":
    main()
