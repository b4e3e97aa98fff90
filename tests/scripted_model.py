"""A scripted stand-in for the Anthropic Messages API, for driving the real Claude Code CLI in tests.

The real CLI, pointed at this server with ANTHROPIC_BASE_URL, sends its normal requests; the
server answers the agent's turns from a fixed script (tool calls, then text), streamed as
server-sent events like the real API, and records every request so a test can look at what
came back (tool results, hook feedback) in the next one. Side requests that are not the agent's
main loop (a title, a quota probe: anything offered no tools) get a short text answer and do not
consume the script.

Usage (in a test):
    with ScriptedModel([tool_use("Bash", {"command": "ls"}), action(make_stop_file), text("done")]) as model:
        env["ANTHROPIC_BASE_URL"] = model.url
        ... run `claude -p ...` ...
    model.agent_requests  # the main-loop request bodies, in order
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL_NAME = "claude-sonnet-4-5"


def tool_use(name, tool_input):
    """A scripted assistant turn that calls one tool."""
    return {"type": "tool_use", "name": name, "input": tool_input}


def text(message):
    """A scripted assistant turn that answers in text and ends the turn (a "stop")."""
    return {"type": "text", "text": message}


def action(function):
    """A scripted step that runs `function()` when reached (say, the human creating a file) and
    then serves the next step: it stands for something that happens between two model turns."""
    return {"type": "action", "run": function}


def _content_block(step, index):
    if step["type"] == "tool_use":
        return {"type": "tool_use", "id": f"toolu_scripted_{index:03d}", "name": step["name"], "input": {}}
    return {"type": "text", "text": ""}


def _delta(step):
    if step["type"] == "tool_use":
        return {"type": "input_json_delta", "partial_json": json.dumps(step["input"])}
    return {"type": "text_delta", "text": step["text"]}


def _final_message(step, index):
    block = _content_block(step, index)
    if step["type"] == "tool_use":
        block["input"] = step["input"]
    else:
        block["text"] = step["text"]
    return {
        "id": f"msg_scripted_{index:03d}",
        "type": "message",
        "role": "assistant",
        "model": MODEL_NAME,
        "content": [block],
        "stop_reason": "tool_use" if step["type"] == "tool_use" else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 10},
    }


def _sse_events(step, index):
    """The event stream of one assistant message: start, one content block, delta, stop."""
    message = _final_message(step, index)
    start = dict(message, content=[], stop_reason=None)
    start["usage"] = {"input_tokens": 10, "output_tokens": 1}
    yield "message_start", {"type": "message_start", "message": start}
    yield "content_block_start", {"type": "content_block_start", "index": 0, "content_block": _content_block(step, index)}
    yield "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": _delta(step)}
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield "message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
        "usage": {"output_tokens": 10},
    }
    yield "message_stop", {"type": "message_stop"}


class JSONHandler(BaseHTTPRequestHandler):
    """What both scripted APIs' handlers share: quiet, JSON answers, server-sent event streams."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def read_json(self):
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _send_json(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_events(self, events):
        """(event name or None, payload) pairs as one streamed answer; the connection then closes."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for event, data in events:
            head = f"event: {event}\n" if event else ""
            self.wfile.write(f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode())
        self.wfile.flush()
        self.close_connection = True


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 that plays a script of model steps; subclasses give
    the handler (the API it speaks). A context manager: serving inside `with`.

    When the script runs out it keeps answering with `fallback` text, so a CLI that goes on
    past the script ends its turn instead of hanging.
    """

    def __init__(self, script, fallback="Script finished."):
        self.script = list(script)
        self.fallback = fallback
        self.agent_requests = []
        self.side_requests = []
        self.other_paths = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self):
        host, port = self._server.server_address
        return f"http://{host}:{port}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def next_step(self, body, recorded=None):
        """Record the request (`recorded`, default its body) and pick the answer, with the index
        that names it: the next script step, or for a request that offers no tools a side answer
        that leaves the script alone."""
        with self._lock:
            if not body.get("tools"):
                self.side_requests.append(body if recorded is None else recorded)
                return text("ok"), 900 + len(self.side_requests)
            self.agent_requests.append(body if recorded is None else recorded)
            while self.script and self.script[0]["type"] == "action":
                self.script.pop(0)["run"]()
            step = self.script.pop(0) if self.script else text(self.fallback)
            return step, len(self.agent_requests)


class ScriptedModel(LoopbackServer):
    """A Messages-API server on 127.0.0.1 that plays `script`, one step per main-loop request."""

    def _handler_class(self):
        model = self

        class Handler(JSONHandler):
            def do_GET(self):
                model.other_paths.append(("GET", self.path))
                self._send_json(404, {"type": "error", "error": {"type": "not_found_error", "message": "scripted model"}})

            def do_HEAD(self):
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self):
                body = self.read_json()
                path = self.path.split("?")[0]
                if path.endswith("/count_tokens"):
                    self._send_json(200, {"input_tokens": 100})
                    return
                if not path.endswith("/v1/messages"):
                    model.other_paths.append(("POST", self.path))
                    self._send_json(404, {"type": "error", "error": {"type": "not_found_error", "message": "scripted model"}})
                    return
                step, index = model.next_step(body)
                if not body.get("stream"):
                    self._send_json(200, _final_message(step, index))
                    return
                self.send_events(_sse_events(step, index))

        return Handler


def _since_last_turn(request):
    """The messages after the model's last turn: tool results, hook feedback, reminders. (The
    CLI may add `system` messages after the user message, so the last message alone is not enough.)"""
    messages = request["messages"]
    last_assistant = max((i for i, message in enumerate(messages) if message["role"] == "assistant"), default=-1)
    return messages[last_assistant + 1:]


def _blocks(message):
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _text_of(value):
    if isinstance(value, list):
        return "\n".join(part.get("text", "") for part in value if isinstance(part, dict))
    return value or ""


def tool_results(request):
    """The tool results the model receives in `request` since its last turn, as (text, is_error)."""
    return [(_text_of(block.get("content")), bool(block.get("is_error")))
            for message in _since_last_turn(request) for block in _blocks(message)
            if block.get("type") == "tool_result"]


def new_text(request):
    """All text the model receives in `request` since its last turn (hook feedback arrives here)."""
    parts = []
    for message in _since_last_turn(request):
        for block in _blocks(message):
            if block.get("type") == "text":
                parts.append(block["text"])
            elif block.get("type") == "tool_result":
                parts.append(_text_of(block.get("content")))
    return "\n".join(parts)
