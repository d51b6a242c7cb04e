"""Incremental detokenization with stop strings: text is released only when it can no longer turn out to be
the start of a stop string, and never mid-way through a multi-byte character."""
from semipd.runtime.sequence import Sequence


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add_token(self, seq: Sequence) -> bool:
        """Extend seq.text by its newest token; True when a stop string was found (text is then cut before it)."""
        ids = seq.output_token_ids
        prefix = self._decode(ids[seq.prefix_offset:seq.read_offset])
        full = self._decode(ids[seq.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            searched_from = max(0, len(seq.text) - self._longest_stop(seq))
            seq.text += full[len(prefix):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            # The earliest match wins, whichever stop string it is: cutting at the first string of the list
            # that matches anywhere could leave an earlier one in the text.
            found = [at for stop in seq.params.stop if (at := seq.text.find(stop, searched_from)) != -1]
            if found:
                seq.text = seq.text[:min(found)]
                seq.prefix_offset = seq.read_offset = len(ids)
                return True
        return False

    def flush(self, seq: Sequence) -> None:
        """At the end, text held back for an unfinished multi-byte character is released as the tokenizer
        renders it (with replacement characters), as a full decode would show it."""
        ids = seq.output_token_ids
        prefix = self._decode(ids[seq.prefix_offset:seq.read_offset])
        full = self._decode(ids[seq.prefix_offset:])
        if len(full) > len(prefix):
            seq.text += full[len(prefix):]
        seq.prefix_offset = seq.read_offset = len(ids)

    @staticmethod
    def _longest_stop(seq: Sequence) -> int:
        return max((len(s) for s in seq.params.stop), default=0)

    def releasable(self, seq: Sequence, finished: bool) -> str:
        """The text not yet sent that is safe to send now."""
        end = len(seq.text) if finished else max(seq.emitted_chars, len(seq.text) - max(0, self._longest_stop(seq) - 1))
        delta = seq.text[seq.emitted_chars:end]
        seq.emitted_chars = end
        return delta
