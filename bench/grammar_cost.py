"""Per-token cost of structured output's mask: xgrammar (what runtime/guided.py uses) against llguidance, on the
same tokenizer, schema and tokens. For each token of a valid JSON document: fill that row's vocabulary mask,
then advance the grammar by the token. Reports set-up, compile and per-token mask time (median, mean, max) over
--repeat passes. llguidance is optional (`pip install llguidance`); without it only xgrammar is measured.

    python bench/grammar_cost.py                        # bench_engine's model tokenizer (32,000 tokens)
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_engine  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
DOC = {"name": "river stone morning", "age": 42, "tags": ["quiet", "north", "letter", "bread"]}


def xgrammar_pass(tokenizer, vocab, ids):
    import xgrammar as xgr
    started = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab))
    setup = time.perf_counter() - started
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - started
    matcher, mask, per = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, vocab), []
    for token in ids:
        started = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        per.append(time.perf_counter() - started)
        assert matcher.accept_token(token)
    return setup, compile_s, per


def llguidance_pass(tokenizer, vocab, ids):
    import llguidance
    import llguidance.hf
    import llguidance.torch
    started = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)))
    compile_s = time.perf_counter() - started
    mask, per = llguidance.torch.allocate_token_bitmask(1, vocab), []
    for token in ids:
        started = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        per.append(time.perf_counter() - started)
        assert matcher.consume_token(token), matcher.get_error()
    return setup, compile_s, per


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer
    shape = bench_engine.ModelShape()
    tokenizer = AutoTokenizer.from_pretrained(bench_engine.prepare_model(shape, bench_engine.DEFAULT_CACHE))
    ids = tokenizer(json.dumps(DOC), add_special_tokens=False).input_ids
    print(f"tokenizer vocabulary {shape.vocab_size}, document {len(ids)} tokens, {args.repeat} passes")
    for name, run in (("xgrammar", xgrammar_pass), ("llguidance", llguidance_pass)):
        try:
            passes = [run(tokenizer, shape.vocab_size, ids) for _ in range(args.repeat)]
        except ImportError:
            print(f"{name:<11} not installed")
            continue
        per = [t for _, _, ts in passes for t in ts]
        print(f"{name:<11} set-up {1e3 * passes[-1][0]:7.1f} ms  compile {1e3 * passes[-1][1]:6.2f} ms  mask per "
              f"token: median {1e6 * statistics.median(per):5.0f} us, mean {1e6 * statistics.fmean(per):5.0f} us, "
              f"max {1e6 * max(per):5.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
