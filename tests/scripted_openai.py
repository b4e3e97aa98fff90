"""A scripted stand-in for the OpenAI APIs, for driving the real Codex and OpenCode CLIs in tests.

Codex speaks the Responses API (POST /v1/responses, streamed), OpenCode with an
openai-compatible provider speaks Chat Completions (POST /v1/chat/completions, streamed); this
server answers both from one fixed script, one step per main-loop request, and records every
request so a test can look at what came back (tool results, hook refusals) in the next one.
Requests that offer no tools (a title, a summary) get a short text answer and do not consume
the script, as in tests/scripted_model.py, whose step makers (tool_use, text, action) it uses.

Tool names are the client's own: Codex calls `exec_command` ({"cmd": ...}) and `apply_patch`
(a freeform tool: the step's input is the patch text); OpenCode calls `bash`, `edit`, `write`,
`read` with its own argument names.

Usage (in a test):
    with ScriptedOpenAI([tool_use("exec_command", {"cmd": "ls"}), text("done")]) as model:
        ... codex exec -c model_providers.scripted.base_url=model.url + "/v1" ...
    tool_outputs(model.agent_requests[1])  # what the CLI sent back for the first tool call
"""

import json

from scripted_model import JSONHandler, LoopbackServer, action, text, tool_use  # noqa: F401  (the step makers, re-exported)

FREEFORM_TOOLS = ("apply_patch",)  # Codex's custom tools: the input is raw text, not JSON arguments


class ScriptedOpenAI(LoopbackServer):
    """A Responses + Chat Completions server on 127.0.0.1 that plays `script`."""

    def _handler_class(self):
        model = self

        class Handler(JSONHandler):
            def do_GET(self):
                model.other_paths.append(("GET", self.path))
                if self.path.split("?")[0].endswith("/models"):
                    self._send_json(200, {"object": "list", "data": []})
                    return
                self._send_json(404, {"error": {"message": "scripted model", "type": "not_found"}})

            def do_POST(self):
                body = self.read_json()
                path = self.path.split("?")[0]
                if path.endswith("/responses"):
                    api, events = "responses", _responses_events
                elif path.endswith("/chat/completions"):
                    api, events = "chat", _chat_events
                else:
                    model.other_paths.append(("POST", self.path))
                    self._send_json(404, {"error": {"message": "scripted model", "type": "not_found"}})
                    return
                step, index = model.next_step(body, recorded=(api, body))
                self.send_events(events(step, index))

        return Handler


USAGE = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 10,
         "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 20}


def _response_item(step, index):
    if step["type"] == "text":
        return {"type": "message", "role": "assistant", "id": f"msg_{index:03d}", "status": "completed",
                "content": [{"type": "output_text", "text": step["text"], "annotations": []}]}
    if step["name"] in FREEFORM_TOOLS:
        return {"type": "custom_tool_call", "id": f"ctc_{index:03d}", "call_id": f"call_{index:03d}",
                "name": step["name"], "input": step["input"], "status": "completed"}
    return {"type": "function_call", "id": f"fc_{index:03d}", "call_id": f"call_{index:03d}", "name": step["name"],
            "arguments": json.dumps(step["input"]), "status": "completed"}


def _responses_events(step, index):
    """One Responses-API turn: created, the output item, completed."""
    response = {"id": f"resp_{index:03d}", "object": "response", "status": "in_progress", "output": []}
    yield "response.created", {"type": "response.created", "response": response}
    item = _response_item(step, index)
    yield "response.output_item.added", {"type": "response.output_item.added", "output_index": 0, "item": item}
    if step["type"] == "text":
        yield "response.output_text.delta", {"type": "response.output_text.delta", "item_id": item["id"],
                                             "output_index": 0, "content_index": 0, "delta": step["text"]}
    yield "response.output_item.done", {"type": "response.output_item.done", "output_index": 0, "item": item}
    yield "response.completed", {"type": "response.completed",
                                 "response": dict(response, status="completed", output=[item], usage=USAGE)}


def _chat_events(step, index):
    """One Chat Completions turn, streamed: a role chunk, the content or tool call, the finish, [DONE]."""
    base = {"id": f"chatcmpl-{index:03d}", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "scripted"}

    def chunk(delta, finish=None, **extra):
        return dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish}], **extra)

    yield None, chunk({"role": "assistant", "content": ""})
    if step["type"] == "text":
        yield None, chunk({"content": step["text"]})
        finish = "stop"
    else:
        arguments = step["input"] if isinstance(step["input"], str) else json.dumps(step["input"])
        yield None, chunk({"tool_calls": [{"index": 0, "id": f"call_{index:03d}", "type": "function",
                                           "function": {"name": step["name"], "arguments": arguments}}]})
        finish = "tool_calls"
    yield None, chunk({}, finish)
    yield None, dict(base, choices=[], usage={"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20})
    yield None, "[DONE]"


# ---------------------------------------------------------------------------
# Reading what the client sent


def tool_outputs(request):
    """The tool results in `request` (an (api, body) pair) since the model's last turn, as text."""
    api, body = request
    if api == "responses":
        items = body.get("input") or []
        last = max((i for i, item in enumerate(items) if item.get("type") in ("function_call", "custom_tool_call")
                    or item.get("role") == "assistant"), default=-1)
        return [_text(item.get("output")) for item in items[last + 1:]
                if item.get("type") in ("function_call_output", "custom_tool_call_output")]
    messages = body.get("messages") or []
    last = max((i for i, message in enumerate(messages) if message.get("role") == "assistant"), default=-1)
    return [_text(message.get("content")) for message in messages[last + 1:] if message.get("role") == "tool"]


def all_text(request):
    """Everything the client sent in `request` (instructions, messages, tool results) as one string."""
    return json.dumps(request[1])


def tool_names(request):
    api, body = request
    return [tool.get("name") or (tool.get("function") or {}).get("name") for tool in body.get("tools") or []]


def _text(value):
    if isinstance(value, list):
        return "\n".join(part.get("text", "") for part in value if isinstance(part, dict))
    if isinstance(value, dict):
        return json.dumps(value)
    return value or ""
