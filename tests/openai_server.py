"""An OpenAI-compatible chat-completions server on 127.0.0.1 for tests and benchmarks: a real (small) model
answers through transformers, or, with no model, a fixed answer (to measure a client, not a model).

It records every request (prompt id, Authorization header) and injects faults on demand: `faults[prompt id]` is a
list of what that prompt's next requests get ("429" with Retry-After, "500", "drop": the connection closed
without a response), then real answers. `latency_s` delays every answer. Run alone:
    python tests/openai_server.py --port 8000 [--model DIR] [--latency-ms 50]"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Optional

RETRY_AFTER_S = "0.05"  # what a 429 asks the client to wait: short, so tests stay fast


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default 5 drops the SYNs of a burst of new connections (1 s retransmits)
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client killed mid-request (tests do that)
            super().handle_error(request, client_address)


class OpenAIServer:
    def __init__(self, model_dir: Optional[str] = None, name: str = "tiny", latency_s: float = 0.0, port: int = 0):
        self.name, self.latency_s = name, latency_s
        self.log: list[dict] = []  # one entry per request: id, auth, outcome
        self.faults: dict[str, list[str]] = {}
        self._lock, self._model_lock = threading.Lock(), threading.Lock()
        self.model = self.tokenizer = None
        if model_dir is not None:
            from compressor.stages.generate.hf_backend import load

            self.model, self.tokenizer = load(str(model_dir), 0)
        self.httpd = _Server(("127.0.0.1", port), _handler(self))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> OpenAIServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset(self, latency_s: float = 0.0) -> None:
        with self._lock:
            self.log.clear()
            self.faults.clear()
            self.latency_s = latency_s

    def requested_ids(self, since: int = 0) -> list[str]:
        with self._lock:
            return [entry["id"] for entry in self.log[since:]]

    def _fault(self, prompt: str) -> Optional[str]:
        with self._lock:
            queue = self.faults.get(prompt)
            return queue.pop(0) if queue else None

    def _record(self, **entry) -> None:
        with self._lock:
            self.log.append(entry)

    def complete(self, body: dict) -> dict:
        from compressor.prompt_rows import prompt_id

        messages = body["messages"]
        n, logprobs = int(body.get("n") or 1), int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
        settings = SimpleNamespace(
            temperature=float(body.get("temperature") or 0),
            top_p=float(body.get("top_p") or 1),
            max_new_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or 16),
            n=n,
            stop=body.get("stop") or [],
            logprobs=logprobs,
        )
        if isinstance(settings.stop, str):
            settings.stop = [settings.stop]
        if self.model is None:
            answers = [{"response": "ok", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}] * n
        else:
            from compressor.stages.generate.hf_backend import answer

            row = {"id": prompt_id(messages), "messages": messages}
            with self._model_lock:
                answers = answer(self.model, self.tokenizer, [row], settings, int(body.get("seed") or 0))
        choices = []
        for i, a in enumerate(answers):
            choice = {"index": i, "message": {"role": "assistant", "content": a["response"]}}
            choice["finish_reason"] = a["finish_reason"]
            choice["logprobs"] = None
            if logprobs:
                steps = a.get("top_logprobs") or []
                chosen = a.get("answer_tokens") or [s[0]["token"] for s in steps]
                choice["logprobs"] = {
                    "content": [
                        {"token": token, "logprob": _logprob(token, s), "bytes": None, "top_logprobs": s}
                        for token, s in zip(chosen, steps)
                    ]
                }
            choices.append(choice)
        completion_tokens = sum(a["completion_tokens"] for a in answers)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.name),
            "choices": choices,
            "usage": {
                "prompt_tokens": answers[0]["prompt_tokens"],
                "completion_tokens": completion_tokens,
                "total_tokens": answers[0]["prompt_tokens"] + completion_tokens,
            },
        }


def _logprob(token: str, alternatives: list[dict]) -> float:
    """The chosen token's log-probability (among the alternatives when it is one of them, as at temperature 0)."""
    return next(
        (a["logprob"] for a in alternatives if a["token"] == token),
        alternatives[-1]["logprob"] if alternatives else 0.0,
    )


def _handler(server: OpenAIServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stall

        def log_message(self, *args) -> None:  # quiet
            pass

        def finish(self) -> None:
            try:
                super().finish()
            except OSError:  # a dropped connection: nothing left to flush
                pass

        def _send(self, status: int, payload: dict, headers: Optional[dict] = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(200, {"object": "list", "data": [{"id": server.name, "object": "model"}]})

        def do_POST(self) -> None:
            from compressor.prompt_rows import prompt_id

            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if not self.path.endswith("/chat/completions") or "messages" not in body:
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            ident, auth = prompt_id(body["messages"]), self.headers.get("Authorization")
            fault = server._fault(ident)
            server._record(id=ident, auth=auth, outcome=fault or "ok")
            if fault == "drop":  # the client sees the connection end with no response
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault == "429":
                self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": RETRY_AFTER_S})
                return
            if fault == "500":
                self._send(500, {"error": {"message": "internal error"}})
                return
            if server.latency_s:
                time.sleep(server.latency_s)
            self._send(200, server.complete(body))

    return Handler


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    running = OpenAIServer(args.model, latency_s=args.latency_ms / 1000, port=args.port)
    print(running.base_url, flush=True)
    running.httpd.serve_forever()
