"""Stand-ins for serving engines: loopback HTTP servers that answer ``/metrics``
in each engine's documented exposition format (names, label sets, histogram
shapes), with counters a test advances, resets (a restart) or hides behind a
hang, garbage or an endless body.

Run as a script (``python engines.py ENGINE PORT STATE_JSON [argv...]``) it is
an engine process of its own, serving the counters held in STATE_JSON.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def _histogram(name: str, labels: str, total: float, count: int) -> list[str]:
    """A histogram whose observations all fell in the middle bucket."""
    sep = "," if labels else ""
    lines = [f"# HELP {name} Histogram of a per-request figure.", f"# TYPE {name} histogram"]
    for bound in BUCKETS:
        in_bucket = count if bound >= 64 else 0
        lines.append(f'{name}_bucket{{{labels}{sep}le="{float(bound)}"}} {float(in_bucket)}')
    lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {float(count)}')
    lines.append(f"{name}_sum{{{labels}}} {float(total)}" if labels else f"{name}_sum {float(total)}")
    lines.append(f"{name}_count{{{labels}}} {float(count)}" if labels else f"{name}_count {float(count)}")
    return lines


def render(engine: str, counters: dict[str, float], model: str = "meta-llama/Llama-3.1-8B-Instruct") -> str:
    """Exposition text for ``engine`` with counters ``prompt``, ``generated``, ``requests``
    (Triton: ``requests``, ``inferences``)."""
    p, g, r = counters.get("prompt", 0.0), counters.get("generated", 0.0), counters.get("requests", 0.0)
    lines: list[str] = [
        "# HELP python_gc_objects_collected_total Objects collected during gc",
        "# TYPE python_gc_objects_collected_total counter",
        'python_gc_objects_collected_total{generation="0"} 1234.0',
    ]
    if engine == "vllm":
        m = f'engine="0",model_name="{model}"'
        lines += [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{m}}} 3.0",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{m}}} {float(p)}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{m}}} {float(g)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
            # vLLM splits successes by finish reason; the sum is the requests.
            f'vllm:request_success_total{{{m},finished_reason="stop"}} {float(r - r // 4)}',
            f'vllm:request_success_total{{{m},finished_reason="length"}} {float(r // 4)}',
            f'vllm:request_success_total{{{m},finished_reason="abort"}} 0.0',
        ]
        # Per-request token histograms hold the same tokens again: they must not count twice.
        lines += _histogram("vllm:request_prompt_tokens", m, p, int(r))
        lines += _histogram("vllm:request_generation_tokens", m, g, int(r))
        lines += _histogram("vllm:iteration_tokens_total", m, p + g, int(r) * 3)
    elif engine == "sglang":
        m = f'model_name="{model}"'
        lines += [
            "# HELP sglang:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE sglang:prompt_tokens_total counter",
            f"sglang:prompt_tokens_total{{{m}}} {float(p)}",
            "# HELP sglang:generation_tokens_total Number of generation tokens processed.",
            "# TYPE sglang:generation_tokens_total counter",
            f"sglang:generation_tokens_total{{{m}}} {float(g)}",
            "# HELP sglang:num_requests_total Number of requests processed.",
            "# TYPE sglang:num_requests_total counter",
            f"sglang:num_requests_total{{{m}}} {float(r)}",
            "# HELP sglang:token_usage The token usage",
            "# TYPE sglang:token_usage gauge",
            f"sglang:token_usage{{{m}}} 0.28",
        ]
        lines += _histogram("sglang:time_to_first_token_seconds", m, 2.5, int(r))
    elif engine == "tgi":
        # TGI (metrics-rs): counters without a _total suffix, token counts as histograms.
        lines += [
            "# TYPE tgi_request_count counter",
            f"tgi_request_count {int(r) + 2}",
            "# TYPE tgi_request_success counter",
            f"tgi_request_success {int(r)}",
            "# TYPE tgi_queue_size gauge",
            "tgi_queue_size 0",
        ]
        lines += _histogram("tgi_request_input_length", "", p, int(r))
        lines += _histogram("tgi_request_generated_tokens", "", g, int(r))
        lines += _histogram("tgi_request_duration", "", 12.5, int(r))
    elif engine == "triton":
        m = 'model="resnet50",version="1"'
        lines += [
            "# HELP nv_inference_request_success Number of successful inference requests, all batch sizes",
            "# TYPE nv_inference_request_success counter",
            f"nv_inference_request_success{{{m}}} {int(r)}",
            "# HELP nv_inference_request_failure Number of failed inference requests, all batch sizes",
            "# TYPE nv_inference_request_failure counter",
            f'nv_inference_request_failure{{{m},reason="BACKEND"}} 2',
            "# HELP nv_inference_count Number of inferences performed (does not include cached requests)",
            "# TYPE nv_inference_count counter",
            f"nv_inference_count{{{m}}} {int(counters.get('inferences', 0))}",
            "# HELP nv_inference_exec_count Number of model executions performed",
            "# TYPE nv_inference_exec_count counter",
            f"nv_inference_exec_count{{{m}}} {int(r)}",
            "# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)",
            "# TYPE nv_gpu_utilization gauge",
            'nv_gpu_utilization{gpu_uuid="GPU-0"} 0.4',
        ]
    elif engine == "llamacpp":
        lines += [
            "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.",
            "# TYPE llamacpp:prompt_tokens_total counter",
            f"llamacpp:prompt_tokens_total {int(p)}",
            "# HELP llamacpp:prompt_seconds_total Prompt process time",
            "# TYPE llamacpp:prompt_seconds_total counter",
            "llamacpp:prompt_seconds_total 12.5",
            "# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.",
            "# TYPE llamacpp:tokens_predicted_total counter",
            f"llamacpp:tokens_predicted_total {int(g)}",
            "# HELP llamacpp:requests_processing Number of requests processing.",
            "# TYPE llamacpp:requests_processing gauge",
            "llamacpp:requests_processing 1",
        ]
    else:
        raise ValueError(engine)
    return "\n".join(lines) + "\n"


class EngineServer:
    """One engine's ``/metrics`` on a loopback port; ``mode`` decides the answer:
    ``ok``, ``hang`` (answers after ``hang_s``), ``garbage``, ``huge`` (an
    endless 50 MB body), ``down`` (HTTP 503)."""

    def __init__(self, engine: str, counters: dict[str, float]) -> None:
        self.engine = engine
        self.counters = dict(counters)
        self.mode = "ok"
        self.hang_s = 5.0
        self.huge_bytes_sent = 0
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.requests += 1
                mode = server.mode
                if mode == "hang":
                    time.sleep(server.hang_s)
                if mode == "down":
                    self.send_response(503)
                    self.end_headers()
                    return
                if mode == "huge":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4")
                    self.send_header("Content-Length", str(50 * 1024 * 1024))
                    self.end_headers()
                    line = b"vllm:generation_tokens_total{model_name=\"x\"} 1e12\n" * 1000
                    try:
                        while server.huge_bytes_sent < 50 * 1024 * 1024:
                            self.wfile.write(line)
                            server.huge_bytes_sent += len(line)
                    except OSError:
                        pass
                    return
                if mode == "garbage":
                    body = (
                        b"\x00\xff<html>not metrics {{{ 12 }\n" * 200
                        + b'vllm:generation_tokens_total{model_name="x" 9e9\n'
                    )
                else:
                    body = render(self.server.engine_name, server.counters).encode()  # type: ignore[attr-defined]
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.engine_name = engine  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def add(self, **delta: float) -> None:
        for key, value in delta.items():
            self.counters[key] = self.counters.get(key, 0.0) + value

    def restart(self, **counters: float) -> None:
        """The engine restarted: its counters start again from these values."""
        self.counters = {key: float(value) for key, value in counters.items()}

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _main() -> None:
    engine, port, state = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            counters = json.loads(state.read_text()) if state.exists() else {}
            body = render(engine, counters).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    _main()
