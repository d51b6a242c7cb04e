"""The sampler's cost per decode step at batch 64, with and without the per-request features (temperature and
top-p, presence/frequency/repetition penalties over each row's history, logit_bias, logprobs with top 5).

Every case runs runtime/sampling.py's sample_step on logits [64, vocab] (float32), as the decode worker calls
it, with each row's prompt and output history as given, and each row's sampled token appended to its output
after the step, as the engine does (so state the sampler keeps across steps, the penalties' token counts, is
measured as it is kept); the median of --repeat runs is reported, after a warm-up. On CUDA the device is
synchronised around each step (its .tolist() does it anyway). Two kinds of logits: "peaked" (a language
model's shape: a few dozen likely tokens over a flat tail, so a top_p 0.9 nucleus holds tens of tokens) and
"flat" (standard normal: the nucleus spans most of the vocabulary, the worst case).

    python bench/sampler_cost.py                      # CPU, vocab 32000 and 128256
    python bench/sampler_cost.py --device cuda
"""
import argparse
import json
import random
import statistics
import sys
import time

import torch

from semipd.runtime.sampling import SamplingParams, sample_step
from semipd.runtime.sequence import Sequence


def request(params: SamplingParams, prompt: list[int], output: list[int]) -> Sequence:
    """A sequence as the decode worker hands it to the sampler, with `output` already generated."""
    seq = Sequence("bench", prompt, params, lambda out: None, torch.device("cpu"))
    seq.output_token_ids += output
    return seq


CASES = {
    "greedy": dict(temperature=0.0),
    "temperature 0.8, top_p 0.9": dict(temperature=0.8, top_p=0.9),
    "+ penalties (presence, frequency, repetition)": dict(temperature=0.8, top_p=0.9, presence_penalty=0.5,
                                                          frequency_penalty=0.5, repetition_penalty=1.1),
    "+ logit_bias (10 tokens)": dict(temperature=0.8, top_p=0.9, logit_bias={i * 97: 2.0 for i in range(10)}),
    "+ logprobs (top 5)": dict(temperature=0.8, top_p=0.9, logprobs=5),
    "all of them": dict(temperature=0.8, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5,
                        repetition_penalty=1.1, logit_bias={i * 97: 2.0 for i in range(10)}, logprobs=5),
}


def make_logits(kind: str, batch: int, vocab: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab, generator=gen)
    if kind == "peaked":
        head = torch.randint(0, vocab, (batch, 40), generator=gen)
        logits.scatter_(1, head, 6 + 6 * torch.rand(batch, 40, generator=gen))
    return logits.to(device)


def time_case(kwargs, batch, vocab, prompt_len, output_len, device, repeat, kind="peaked") -> float:
    rng = random.Random(0)
    rows = [request(SamplingParams(max_tokens=16, **kwargs), [rng.randrange(vocab) for _ in range(prompt_len)],
                [rng.randrange(vocab) for _ in range(output_len)]) for _ in range(batch)]
    logits = make_logits(kind, batch, vocab, device)
    times = []
    for i in range(repeat + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        sampled = sample_step(logits, rows)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - started)
        for row, s in zip(rows, sampled):
            row.output_token_ids.append(s.token)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--logits", choices=["peaked", "flat"], default="peaked")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results = {}
    print(f"sampler per decode step, batch {args.batch}, history {args.prompt_len} prompt + {args.output_len} "
          f"output tokens, {args.logits} logits, {device}, torch threads {torch.get_num_threads()}")
    print(f"{'case':<48}" + "".join(f"{'vocab ' + str(v):>14}" for v in args.vocab))
    for name, kwargs in CASES.items():
        ms = [1e3 * time_case(kwargs, args.batch, v, args.prompt_len, args.output_len, device, args.repeat,
                              args.logits) for v in args.vocab]
        results[name] = dict(zip(map(str, args.vocab), ms))
        print(f"{name:<48}" + "".join(f"{m:>11.2f} ms" for m in ms))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ms": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
