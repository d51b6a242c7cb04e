"""Incremental detokenization with stop strings: text is released only when it can no longer turn out to be
the start of a stop string, and never mid-way through a multi-byte character."""
from semipd.runtime.sequence import Sequence


def rust_decoder(tokenizer):
    """The `tokenizers` library's own decode, when transformers' `decode` would add nothing to it: a plain fast
    tokenizer (no subclass with its own `_decode`) that does not clean up spaces. transformers' wrapper costs
    ~9 us a call against ~1 us, and the detokenizer calls it twice a token: at batch 64 that was over 1 ms of
    every decode step. None otherwise, and then transformers decodes."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    if (not isinstance(tokenizer, TokenizersBackend) or type(tokenizer)._decode is not TokenizersBackend._decode
            or tokenizer.clean_up_tokenization_spaces):
        return None
    backend = tokenizer.backend_tokenizer
    return lambda ids: backend.decode(ids, skip_special_tokens=True)


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._decode = rust_decoder(tokenizer) or self._decode_through_transformers

    def _decode_through_transformers(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add_token(self, seq: Sequence) -> bool:
        """Extend seq.text by its newest token; True when a stop string was found (text is then cut before it)."""
        ids = seq.output_token_ids
        prefix = self._decode(ids[seq.prefix_offset:seq.read_offset])
        full = self._decode(ids[seq.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            searched_from = max(0, len(seq.text) - seq.params.longest_stop)
            seq.text += full[len(prefix):]
            if not seq.params.stop:
                return False
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

    def releasable(self, seq: Sequence, finished: bool) -> str:
        """The text not yet sent that is safe to send now."""
        end = len(seq.text)
        if not finished and seq.params.stop:
            end = max(seq.emitted_chars, end - max(0, seq.params.longest_stop - 1))
        delta = seq.text[seq.emitted_chars:end]
        seq.emitted_chars = end
        return delta
