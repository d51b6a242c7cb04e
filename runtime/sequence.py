"""One request as the engine sees it: tokens, its KV block table, and what it has streamed so far."""
import itertools
import time
from dataclasses import dataclass
from enum import Enum, auto
from typing import Callable

import torch

from semipd.runtime.sampling import SamplingParams


class Status(Enum):
    WAITING = auto()    # in the prefill queue (new, or preempted and waiting to be recomputed)
    PREFILL = auto()    # admitted: its prompt is being prefilled (maybe in chunks)
    HANDOFF = auto()    # prefilled, first token sampled, waiting for the decode worker to take it
    DECODE = auto()     # in the decode batch
    FINISHED = auto()


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    token_ids: list[int]            # new token ids in this chunk
    text: str                       # new text in this chunk (stop strings already cut)
    finished: bool
    finish_reason: str | None       # "stop" | "length" | "abort" | None
    prompt_tokens: int
    completion_tokens: int          # cumulative
    cached_tokens: int = 0          # prompt tokens served from the prefix cache
    logprobs: list | None = None    # with params.logprobs: a TokenLogprobs per token of token_ids


_order = itertools.count()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 on_output: Callable[[RequestOutput], None], device: torch.device):
        self.request_id = request_id
        self.order = next(_order)                     # admission order: "newest" means largest
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.on_output = on_output
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.table_row: int | None = None              # its row in BlockManager.tables while it holds blocks
        self.num_computed_tokens = 0                  # tokens whose K/V are in the cache
        self.block_hashes: list[bytes] = []           # chained hash of each full block of tokens (prefix cache)
        self.num_registered_blocks = 0                # leading blocks already offered to the prefix cache
        self.num_cached_tokens: int | None = None     # prompt tokens the first admission found in the cache
        self.aborted = False
        self.preemptions = 0
        self.finish_reason: str | None = None
        self.ready_event = None                        # CUDA event the decode worker waits on after handoff
        self.generator = None
        self.grammar = None                            # xgrammar matcher when the output must follow a grammar
        self.token_counts = None                       # sampling.TokenCounts, kept for penalized requests
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        # detokenizer state (see Detokenizer)
        self.text = ""
        self.emitted_chars = 0
        self.prefix_offset = 0
        self.read_offset = 0
        self.pending_ids: list[int] = []              # token ids produced but not yet sent
        self.pending_logprobs: list = []              # their TokenLogprobs (params.logprobs only)
        # timings for metrics
        self.arrival_time = time.monotonic()
        self.admitted_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, slicing each part (joining them first would copy the whole
        context on every call: hashing a full block during decode does this call)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
