"""A rewriter server for tests of the `openai` backend's failure handling: a real HTTP server on
127.0.0.1 (real sockets, so a reply can drip or be huge) that answers every chat request
correctly (made from our prompts or from prompts in the reference's layout), or in one chosen
broken way.

    with FakeRewriter() as fake:          # fake.url: the base_url to configure
        fake.mode = "html"                # every later request gets an HTML page

As its own process (what `asd.server.launch` starts in tests; it answers /health and /v1/models
as vLLM does, after `--ready-after` seconds):

    python -m tests.fake_rewriter --port 8000 [--mode good] [--model fake] [--ready-after 0]
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
from typing import Any

WRONG = ("ring", "pole", "cross", "bar", "star")
EXPLANATION = "The object has the outline and the flat colour of this class, unlike the other options."
MODES = (
    "good", "html", "not-json", "null-content", "http-400", "wrong-count", "drip", "huge",
    "http-500", "unknown-model", "cut",
)  # fmt: skip


def good_reply(body: dict[str, Any]) -> dict[str, Any]:
    """A correct chat completion for a request of the openai backend: for every numbered
    question, as many distinct wrong answers as it asks for and an explanation when asked.
    A request made from a prompt in the reference's layout gets `reference_reply`."""
    text = body["messages"][-1]["content"][-1]["text"]
    if "Wrong answers to write:" not in text:
        return reference_reply(body)
    items = re.findall(
        r"(\d+)\. Question: .*\n   Correct answer: (.*)\n   Wrong answers to write: (\d)\n"
        r"   Explanation to write: (.*)",
        text,
    )
    answers = [
        {
            "number": int(k),
            "wrong_answers": [w for w in WRONG if w != correct][: int(n)],
            "explanation": _words(int(re.search(r"\d+", want).group())) if "about" in want else "",
        }
        for k, correct, n, want in items
    ]
    return _completion(json.dumps({"answers": answers}))


def reference_reply(body: dict[str, Any]) -> dict[str, Any]:
    """A correct reply to a reference-layout prompt, shaped like a schema-guided server would:
    every field of the request's json_schema filled (the *_index fields numbered 1..n), the
    distractors taken from WRONG minus any word of the prompt, explanations of the first "N words"
    the prompt asks for (20 if it names none)."""
    text = body["messages"][-1]["content"][-1]["text"]
    schema = body["response_format"]["json_schema"]["schema"]
    asked = re.search(r"(\d+) words", text)
    n_words = int(asked.group(1)) if asked else 20
    wrong = [w for w in WRONG if not re.search(rf"\b{w}\b", text, re.IGNORECASE)]

    def entry(props: dict[str, Any], number: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in props:
            if key.endswith("_index"):
                out[key] = number
            elif key == "distractor_options":
                out[key] = wrong[:3]
            elif key == "distractor_option":
                out[key] = wrong[0]
            elif key in ("explanation", "description"):
                out[key] = _words(n_words)
            else:  # the echoed question / answer / category
                out[key] = "as given"
        return out

    if schema["type"] == "array":
        reply: Any = [entry(schema["items"]["properties"], k) for k in range(1, schema["minItems"] + 1)]
    else:
        reply = entry(schema["properties"], 1)
    return _completion("```json\n" + json.dumps(reply, indent=2) + "\n```")


def _words(n: int) -> str:
    """An explanation of about `n` words (what the prompt asks for)."""
    words = (EXPLANATION.rstrip(".") + " and").split() * (n // 10 + 1)
    return " ".join(words[:n]) + "."


def _completion(content: str | None, finish_reason: str = "stop") -> dict[str, Any]:
    return {
        "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}]
    }


class FakeRewriter:
    """The server; `mode` may change between requests; `requests` counts what arrived and
    `sent_bytes` what the last huge reply got out before the client hung up."""

    def __init__(self, port: int = 0, model: str = "fake", ready_after_s: float = 0.0) -> None:
        self.mode = "good"
        self.model = model
        self.ready_at = time.monotonic() + ready_after_s
        self.requests = 0
        self.bodies: list[dict[str, Any]] = []  # every request body, in arrival order
        self.sent_bytes = 0
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                ready = time.monotonic() >= fake.ready_at
                if self.path == "/health" and ready:
                    fake.send(self, 200, "application/json", "{}")
                elif self.path == "/v1/models" and ready:
                    models = {"object": "list", "data": [{"id": fake.model, "object": "model"}]}
                    fake.send(self, 200, "application/json", json.dumps(models))
                else:  # vLLM while it loads: no answer yet
                    fake.send(self, 503 if not ready else 404, "text/plain", "not ready")

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests += 1
                fake.bodies.append(body)
                fake.answer(self, body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}/v1"

    def answer(self, h: http.server.BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        mode = self.mode
        if mode == "drip":  # headers at once, then one byte every 0.5 s: no read ever times out
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", "100000")
            h.end_headers()
            try:
                for _ in range(100000):
                    h.wfile.write(b" ")
                    h.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                return
        if mode == "huge":  # a 60 MB reply, written until the client stops reading
            chunk, total = b"x" * 2**20, 60 * 2**20
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(total))
            h.end_headers()
            self.sent_bytes = 0
            try:
                while self.sent_bytes < total:
                    h.wfile.write(chunk)
                    self.sent_bytes += len(chunk)
            except OSError:
                pass
            return
        status, ctype, payload = 200, "application/json", None
        if mode == "good":
            payload = json.dumps(good_reply(body))
        elif mode == "html":
            ctype, payload = "text/html", "<html><body><h1>502 Bad Gateway</h1></body></html>"
        elif mode == "not-json":
            payload = json.dumps(_completion("Sure! Here are some wrong answers: ring, pole, cross."))
        elif mode == "null-content":
            payload = json.dumps(_completion(None))
        elif mode == "http-400":
            status, payload = 400, json.dumps({"error": {"message": "prompt is too long for this model"}})
        elif mode == "http-500":  # what vLLM answered every structured request of a tokenizer without "{"
            status, payload = (
                500,
                json.dumps({"error": {"message": "grammar rejected tokens [0]", "code": 500}}),
            )
        elif mode == "unknown-model":
            status, payload = (
                404,
                json.dumps({"error": {"message": f"The model `{body['model']}` does not exist."}}),
            )
        elif mode == "cut":  # the reply stopped at max_tokens, mid-JSON
            text = good_reply(body)["choices"][0]["message"]["content"]
            payload = json.dumps(_completion(text[: len(text) // 2], finish_reason="length"))
        elif mode == "wrong-count":
            reply = good_reply(body)
            answers = json.loads(reply["choices"][0]["message"]["content"])["answers"]
            payload = json.dumps(_completion(json.dumps({"answers": answers + answers[:1]})))
        else:
            raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
        self.send(h, status, ctype, payload)

    @staticmethod
    def send(h: http.server.BaseHTTPRequestHandler, status: int, ctype: str, payload: str) -> None:
        data = payload.encode()
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def __enter__(self) -> FakeRewriter:
        threading.Thread(target=self._server.serve_forever, daemon=True, name="fake-rewriter").start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def main() -> None:
    import argparse
    import os

    ap = argparse.ArgumentParser(description="the fake rewriter as a server process")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", default="good", choices=MODES)
    ap.add_argument("--model", default="fake")
    ap.add_argument("--ready-after", type=float, default=0.0, help="seconds before /health answers")
    a = ap.parse_args()
    fake = FakeRewriter(a.port, a.model, a.ready_after)
    fake.mode = a.mode
    print(f"fake rewriter pid {os.getpid()} on port {a.port}, mode {a.mode}", flush=True)
    fake._server.serve_forever()


if __name__ == "__main__":
    main()
