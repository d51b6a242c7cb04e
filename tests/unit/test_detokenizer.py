"""The incremental detokenizer against a full decode, on the tiny model's real byte-level BPE tokenizer: the
`tokenizers` fast path gives transformers' text, multi-byte characters split across tokens are never streamed
half-way, stop strings cut at the earliest match, and what could start a stop string is held back."""
import random

import pytest
from transformers import AutoTokenizer

from semipd.runtime.detokenizer import Detokenizer, rust_decoder
from semipd.runtime.sampling import SamplingParams
from semipd.runtime.sequence import Sequence
from semipd.runtime.tiny_model import write_tiny_model

TEXT = "héllo 漢字🙂 the end, naïve café — ok"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(write_tiny_model(tmp_path_factory.mktemp("tok") / "m"))


def stream(detokenizer, ids, stop=()):
    """Feed ids one by one as the engine does; the deltas released and whether a stop string ended it."""
    seq = Sequence("r", [1], SamplingParams(max_tokens=len(ids), stop=list(stop)), lambda out: None, "cpu")
    deltas = []
    for token in ids:
        seq.output_token_ids.append(token)
        if detokenizer.add_token(seq):
            deltas.append(detokenizer.releasable(seq, finished=True))
            return deltas, True
        deltas.append(detokenizer.releasable(seq, finished=False))
    detokenizer.flush(seq)
    deltas.append(detokenizer.releasable(seq, finished=True))
    return deltas, False


def test_the_fast_path_is_taken_for_a_plain_fast_tokenizer_and_decodes_as_transformers_does(tokenizer):
    decode = rust_decoder(tokenizer)
    assert decode is not None
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 12))]
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)


def test_transformers_decodes_when_it_would_change_the_text(tokenizer):
    tokenizer.clean_up_tokenization_spaces = True
    try:
        assert rust_decoder(tokenizer) is None
    finally:
        tokenizer.clean_up_tokenization_spaces = False

    class OwnDecode(type(tokenizer)):
        def _decode(self, token_ids, **kwargs):
            return "x"
    subclassed = OwnDecode.__new__(OwnDecode)
    subclassed.__dict__.update(tokenizer.__dict__)
    assert rust_decoder(subclassed) is None
    assert Detokenizer(subclassed)._decode([1, 2]) == "x"
    assert rust_decoder(object()) is None


def test_streamed_text_equals_the_full_decode_and_never_splits_a_character(tokenizer):
    rng = random.Random(1)
    cases = [tokenizer(TEXT).input_ids] + [[rng.randrange(len(tokenizer)) for _ in range(40)] for _ in range(30)]
    for ids in cases:
        deltas, stopped = stream(Detokenizer(tokenizer), ids)
        assert not stopped
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    deltas, _ = stream(Detokenizer(tokenizer), tokenizer(TEXT).input_ids)
    assert all("\ufffd" not in d for d in deltas)      # the split characters came out whole
    assert "".join(deltas) == TEXT


def test_stop_strings_cut_at_the_earliest_match_and_hold_back_a_possible_start(tokenizer):
    ids = tokenizer(TEXT).input_ids
    deltas, stopped = stream(Detokenizer(tokenizer), ids, stop=["café", "end"])
    assert stopped and "".join(deltas) == TEXT[:TEXT.index("end")]
    deltas, stopped = stream(Detokenizer(tokenizer), ids, stop=["zzzz"])
    assert not stopped and "".join(deltas) == TEXT
    # until the end, the last 3 characters (a possible start of "zzzz") were never sent
    assert len("".join(deltas[:-1])) <= len(TEXT) - 3
