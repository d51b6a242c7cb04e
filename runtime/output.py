"""From sampled tokens to what a client sees: each token recorded with its timings, detokenized against the stop
strings, judged (does it end the request, and why), and streamed through the request's callback."""
import time

from semipd.runtime.detokenizer import Detokenizer
from semipd.runtime.metrics import EngineMetrics
from semipd.runtime.recent import RecentSamples
from semipd.runtime.sampling import Sampled
from semipd.runtime.sequence import RequestOutput, Sequence


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int, metrics: EngineMetrics,
                 recent: RecentSamples):
        self.detokenizer = Detokenizer(tokenizer)
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.metrics = metrics
        self.recent = recent

    def append_token(self, seq: Sequence, sampled: Sampled) -> str | None:
        """Record a sampled token and stream what can be streamed; the finish reason when it ends the request
        (the final output is then sent by `finished`)."""
        now = time.monotonic()
        token = sampled.token
        seq.output_token_ids.append(token)
        seq.pending_ids.append(token)
        if seq.params.logprobs is not None:
            seq.pending_logprobs.append(sampled.logprobs)
        self.metrics.generation_tokens.inc()
        self.recent.count("output_tokens")
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.metrics.prompt_tokens.inc(len(seq.prompt_token_ids))
            self.metrics.ttft.observe(now - seq.arrival_time)
            self.recent.ttft(now - seq.arrival_time)
        elif seq.last_token_time is not None:
            self.metrics.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        p = seq.params
        if self.detokenizer.add_token(seq):
            return "stop"
        reason = None
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids or sampled.grammar_done:
            reason = "stop"
        elif len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason:
            self.detokenizer.flush(seq)
        else:
            self._emit(seq, finished=False)
        return reason

    def finished(self, seq: Sequence) -> None:
        """The request has left the engine (seq.finish_reason says why): its latencies, its last output."""
        if seq.finish_reason != "abort" and seq.first_token_time is not None:
            now = time.monotonic()
            self.metrics.e2e.observe(now - seq.arrival_time)
            if len(seq.output_token_ids) > 1:
                tpot = (now - seq.first_token_time) / (len(seq.output_token_ids) - 1)
                self.metrics.tpot.observe(tpot)
                self.recent.tpot(tpot)
        self._emit(seq, finished=True)

    def _emit(self, seq: Sequence, finished: bool):
        text = self.detokenizer.releasable(seq, finished)
        ids, seq.pending_ids = seq.pending_ids, []
        logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        seq.on_output(RequestOutput(seq.request_id, ids, text, finished, seq.finish_reason,
                                    len(seq.prompt_token_ids), len(seq.output_token_ids),
                                    seq.num_cached_tokens or 0, logprobs))
