"""One API request's choices: n per prompt, each its own engine request, and how their outputs become OpenAI
choices (text with echo, token ids, logprobs, usage). The server's handlers share this for both endpoints."""
import asyncio

from semipd.runtime.protocol import chat_logprobs, completion_logprobs, usage
from semipd.runtime.sequence import RequestOutput


class Choices:
    """Adds every choice to the engine at once (so a full queue refuses the whole request, nothing half-done)
    and gathers their outputs on one queue, in the order the workers produce them."""

    def __init__(self, engine, request_id: str, specs: list[tuple[int, list[int], object]],
                 registry: set | None = None):
        self.engine = engine
        self.registry = registry if registry is not None else set()   # where open engine requests are known
        self.queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        self.request_ids: list[str] = []
        self.unfinished = len(specs)
        self.last: dict[int, RequestOutput] = {}
        self._specs = [(f"{request_id}-{index}", index, ids, params) for index, ids, params in specs]

    async def open(self) -> tuple[int, RequestOutput]:
        """Add the choices; their first output (EngineOverloaded when the queue is full: nothing stays added)."""
        loop = asyncio.get_running_loop()
        try:
            for request_id, index, ids, params in self._specs:
                self.engine.add_request(request_id, ids, params,
                                        lambda out, i=index: loop.call_soon_threadsafe(self.queue.put_nowait,
                                                                                       (i, out)))
                self.request_ids.append(request_id)
                self.registry.add(request_id)
            return await self.next()
        except BaseException:
            self.abort()
            raise

    async def next(self) -> tuple[int, RequestOutput]:
        index, out = await self.queue.get()
        self.last[index] = out
        if out.finished:
            self.unfinished -= 1
        return index, out

    async def follow(self, first):
        yield first
        while self.unfinished:
            yield await self.next()

    async def collect(self) -> dict[int, list[RequestOutput]]:
        try:
            outs: dict[int, list[RequestOutput]] = {}
            async for index, out in self.follow(await self.open()):
                outs.setdefault(index, []).append(out)
            return outs
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop whatever is unfinished (a client gone, an error); finished requests are not touched."""
        for request_id in self.request_ids:
            self.engine.abort(request_id)
            self.registry.discard(request_id)


class ChoiceRenderer:
    """Outputs of one choice -> the pieces of its OpenAI body: text (after the echoed prompt), finish reason,
    logprobs object, token ids; and the request's usage."""

    def __init__(self, chat: bool, tokenizer, prompts: list[list[int]], n: int, echo: list[str] | None):
        self.chat, self.tokenizer, self.prompts, self.n, self.echo = chat, tokenizer, prompts, n, echo
        self._offsets: dict[int, int] = {}         # completions: text offset where each choice's next chunk starts
        self._echoed: set[int] = set()

    def prompt_of(self, index: int) -> list[int]:
        return self.prompts[index // self.n]

    def _text(self, index: int, text: str) -> str:
        if self.echo is not None and index not in self._echoed:
            self._echoed.add(index)
            return self.echo[index // self.n] + text
        return text

    def _logprobs(self, index: int, outs: list[RequestOutput], text_start: int) -> dict | None:
        entries = []
        for out in outs:
            for token, lp in zip(out.token_ids, out.logprobs or []):
                if lp is None:
                    continue
                entries.append((self.tokenizer.decode([token]), lp.logprob,
                                [(self.tokenizer.decode([t]), v) for t, v in lp.top]))
        if not outs or outs[-1].logprobs is None or not any(o.logprobs for o in outs):
            return None
        if self.chat:
            return chat_logprobs(entries)
        offset = self._offsets.get(index, text_start)
        body = completion_logprobs(entries, offset)
        self._offsets[index] = offset + sum(len(t) for t, _, _ in entries)
        return body

    def chunk(self, index: int, outs: list[RequestOutput]) -> tuple:
        """(text, finish_reason, token_ids, logprobs) of one streamed chunk made of these outputs."""
        last = outs[-1]
        echo_len = len(self.echo[index // self.n]) if self.echo is not None and index not in self._echoed else 0
        text = self._text(index, "".join(o.text for o in outs))
        logprobs = self._logprobs(index, outs, echo_len)
        return (text, last.finish_reason if last.finished else None, [t for o in outs for t in o.token_ids],
                logprobs)

    def full(self, index: int, outs: list[RequestOutput]) -> tuple:
        """(text, finish_reason, logprobs, token_ids, prompt_token_ids) of one whole choice."""
        echo_len = len(self.echo[index // self.n]) if self.echo is not None else 0
        text = self._text(index, "".join(o.text for o in outs))
        finish = outs[-1].finish_reason if outs else "abort"
        return (text, finish, self._logprobs(index, outs, echo_len), [t for o in outs for t in o.token_ids],
                self.prompt_of(index))

    def usage(self, outputs: dict) -> dict:
        """Prompt tokens once per prompt (as OpenAI counts n > 1), completion tokens of every choice."""
        last = {index: (outs[-1] if isinstance(outs, list) else outs) for index, outs in outputs.items()}
        per_prompt = {}
        for index, out in last.items():
            per_prompt.setdefault(index // self.n, out)
        prompt_tokens = sum(len(self.prompts[p]) for p in range(len(self.prompts)))
        cached = sum(out.cached_tokens for out in per_prompt.values())
        return usage(prompt_tokens, sum(out.completion_tokens for out in last.values()), cached)
