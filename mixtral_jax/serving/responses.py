"""OpenAI response bodies from the engine's tokens: one engine request per choice (`n` of each prompt),
text with stop strings cut, logprobs, tool calls, streamed as server-sent events in OpenAI's chunk format
or returned whole. FastAPI's response classes are imported when a response is built (the `serve` extra).
"""

import asyncio
import json
import time
import uuid

from mixtral_jax.inference.engine import Engine, RequestError
from mixtral_jax.serving.protocol import Parsed, TextStream, choice_params, error_body, finish_reason
from mixtral_jax.text.tokenizer import Tokenizer
from mixtral_jax.text.tool_calls import ToolCallStream, assistant_message

DISCONNECT_POLL_SECONDS = 0.01  # a small model finishes 100 tokens in well under a second; notice a hang-up sooner


class _Choice:
    """One engine request's answer as it arrives: text (stop strings cut), token ids, logprob entries not yet
    sent, and, after `[TOOL_CALLS]`, the tool calls."""

    def __init__(self, index: int, req: Parsed, tokenizer: Tokenizer, chat: bool):
        self.index, self.req, self.tokenizer, self.chat = index, req, tokenizer, chat
        self.prompt = req.prompts[index // req.n]
        self.text = TextStream(tokenizer, req.stops)
        self.ids: list[int] = []
        self.handle = None
        self.reason: str | None = None
        self.marker = tokenizer.control_id("[TOOL_CALLS]") if req.tools else None
        self.tools: ToolCallStream | None = None  # set once the model writes [TOOL_CALLS]
        self.logprobs: list[dict] = []  # entries not yet sent
        self.tool_text = ""  # the text after [TOOL_CALLS]
        self._tools_decoder = tokenizer.incremental_decoder()
        self._message = None

    def push(self, event) -> tuple[str, list[dict]]:
        """A token id or the engine's finish reason -> (content text now safe to send, tool-call deltas)."""
        if isinstance(event, str):
            return self._finish(event)
        if self.text.stopped:  # tokens the engine drew before it saw the cancel
            return "", []
        self.ids.append(event)
        self._logprob(event, len(self.ids) - 1)
        if self.tools is not None or event == self.marker:
            if self.tools is None:
                self.tools = ToolCallStream()
                return self.text.push(None), []
            return "", self._tool_piece(self._tools_decoder.push(event))
        piece = self.text.push(event)
        if self.text.stopped:
            self.handle.cancel(reason="stop")
        return piece, []

    def _tool_piece(self, piece: str) -> list[dict]:
        """A forced call (a grammar holds it to the format) streams as it comes; one the model chose to make
        is held until it has parsed."""
        self.tool_text += piece
        return self.tools.push(piece) if self.req.grammar is not None else []

    def _finish(self, engine_reason: str) -> tuple[str, list[dict]]:
        content, deltas = ("" if self.text.stopped else self.text.push(None)), []
        if self.tools is not None:
            deltas = self._tool_piece(self._tools_decoder.flush())
            calls = self.message().get("tool_calls")
            if calls and self.req.grammar is None:
                deltas = ToolCallStream().push(self.tool_text)
            elif not calls:  # not a usable call: the text as it was written
                content += self.tool_text
        self.reason = "stop" if self.text.stopped else finish_reason(engine_reason, self.text)
        if self.message().get("tool_calls"):
            self.reason = "tool_calls"
        return content, deltas

    def message(self) -> dict:
        """The whole answer as OpenAI's assistant message (tool calls parsed where the model made some)."""
        if self._message is None:
            self._message = {"role": "assistant", "content": self.text.text + self.tool_text}
            if self.tools is not None:
                parsed = assistant_message(self.tokenizer, self.ids)
                if parsed.get("tool_calls"):
                    self._message = parsed
        return self._message

    def _logprob(self, token: int, i: int) -> None:
        got = self.handle.request_logprobs(i) if self.req.params.logprobs is not None else None
        if got is None:
            return
        chosen, top = got
        name = self._token(token)
        if self.chat:
            self.logprobs.append({"token": name, "logprob": chosen, "bytes": list(self.tokenizer.token_bytes(token)),
                                  "top_logprobs": [{"token": self._token(t), "logprob": v,
                                                    "bytes": list(self.tokenizer.token_bytes(t))} for t, v in top]})
        else:
            self.logprobs.append({"token": name, "logprob": chosen, "top": {self._token(t): v for t, v in top},
                                  "offset": len(self.text.text)})

    def _token(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="backslashreplace")

    def take_logprobs(self):
        """The logprob entries not yet sent, in the endpoint's form (None when logprobs are off)."""
        if self.req.params.logprobs is None:
            return None
        entries, self.logprobs = self.logprobs, []
        if self.chat:
            return {"content": entries, "refusal": None}
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries], "text_offset": [e["offset"] for e in entries]}


class _Handle:
    """An engine request with its logprobs readable by token index."""

    def __init__(self, request):
        self.request = request

    def cancel(self, reason: str | None = None):
        """`reason`: why, when the answer is complete ("stop": a stop string matched), for the metrics;
        None when the client went away."""
        if reason is not None:
            self.request.stopped_by = reason
        self.request.cancel()

    def request_logprobs(self, i: int):
        return self.request.logprobs[i] if i < len(self.request.logprobs) else None


async def respond(http, req: Parsed, *, chat: bool, engine: Engine, tokenizer: Tokenizer, model_name: str):
    """Submit every choice of `req` and answer: a JSON body, or a stream of server-sent events."""
    from fastapi.responses import JSONResponse, StreamingResponse

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    choices = [_Choice(i, req, tokenizer, chat) for i in range(len(req.prompts) * req.n)]
    try:
        for c in choices:
            def on_event(e, i=c.index):
                loop.call_soon_threadsafe(events.put_nowait, (i, e))

            c.handle = _Handle(engine.submit(c.prompt, choice_params(req, c.index), on_event, on_event,
                                             req.constraint(tokenizer, engine.model.config.vocab_size), req.adapter))
    except RequestError as e:  # shutting down
        for c in choices:
            if c.handle is not None:
                c.handle.cancel()
        return JSONResponse(error_body(str(e), kind="server_error"), status_code=503)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"

    async def pieces():
        """(choice, text, tool deltas) per engine event until every choice has finished; cancels the engine
        requests if abandoned."""
        try:
            left = len(choices)
            while left:
                i, event = await events.get()
                c = choices[i]
                if c.reason is not None:
                    continue  # a cancelled (stop string) choice's last tokens
                piece, deltas = c.push(event)  # after a stop string: "" until the engine's finish (the cancel)
                left -= c.reason is not None
                yield c, piece, deltas
        finally:
            for c in choices:
                c.handle.cancel()  # a no-op once finished; frees the slots when the client went away

    def usage():
        prompt = sum(map(len, req.prompts))
        done = sum(c.handle.request.n_generated for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def echo(c):
        return tokenizer.decode(c.prompt) if req.echo else ""

    if not req.stream:
        async def watch():  # a client that hangs up before the answer is complete frees the slots too
            while not await http.is_disconnected():  # cheap: reads a queued message, never blocks
                await asyncio.sleep(DISCONNECT_POLL_SECONDS)
            for c in choices:
                c.handle.cancel()

        watcher = asyncio.create_task(watch())
        try:
            async for _ in pieces():
                pass
        finally:
            watcher.cancel()
        if chat:
            body = [{"index": c.index, "message": c.message(), "logprobs": c.take_logprobs(),
                     "finish_reason": c.reason} for c in choices]
        else:
            body = [{"index": c.index, "text": echo(c) + c.text.text, "logprobs": c.take_logprobs(),
                     "finish_reason": c.reason} for c in choices]
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": body, "usage": usage()}

    chunk_obj = "chat.completion.chunk" if chat else "text_completion"

    def event(data_choices, with_usage=None):
        data = {"id": rid, "object": chunk_obj, "created": int(time.time()), "model": model_name,
                "choices": data_choices}
        if req.include_usage:
            data["usage"] = with_usage
        return f"data: {json.dumps(data)}\n\n"

    def chunk(c, piece, deltas, reason):
        if chat:
            delta = {"content": piece} if piece else {}
            if deltas:
                delta["tool_calls"] = deltas
            return {"index": c.index, "delta": delta, "logprobs": c.take_logprobs(), "finish_reason": reason}
        return {"index": c.index, "text": piece, "logprobs": c.take_logprobs(), "finish_reason": reason}

    async def sse():
        for c in choices:
            if chat:
                yield event([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            elif req.echo:
                yield event([{"index": c.index, "text": echo(c), "logprobs": None, "finish_reason": None}])
        try:
            async for c, piece, deltas in pieces():
                if piece or deltas or c.reason or c.logprobs:
                    yield event([chunk(c, piece, deltas, c.reason)])
        finally:  # the client went away mid-stream: free the slots now, not when the generator is collected
            for c in choices:
                c.handle.cancel()
        if req.include_usage:
            yield event([], usage())
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")
