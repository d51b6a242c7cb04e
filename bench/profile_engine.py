"""A step-time profile of a running semipd engine, read from its own metrics, in exactly bench/sm_sweep.py's format,
so `semipd simulate --gpu profile --profile FILE` can be calibrated on any machine, a CPU included.

For every split (set through PUT /admin/partition; the engine must run --partition-policy external), it sends
requests through the OpenAI API and reads the engine's `semipd:step_seconds` and `semipd:step_tokens` for each
phase from /metrics before and after, so each figure is the engine's mean step time over the steps it took:
- prefill alone, N tokens: sequential one-token completions of an N-token prompt (N <= the token budget, so
  each is one prefill step and no decode step);
- decode alone, batch B: B streams with a --context-token prompt, measured from the moment all B have their
  first token until the first one ends, so every step in the window ran the whole batch (the row's size is the
  mean batch the engine reports, its context the mean KV length);
- the API's own cost: how much longer an idle one-token request takes, seen from the client, than its prefill
  step (HTTP, tokenizing, queueing, the first chunk), as meta["api_overhead_ms"];
- with the other phase busy: the same two, at once (prefill N against a decode batch of --partner-batch, decode
  B against back-to-back prefills of --partner-tokens), the way the engine's two workers contend.

    semipd serve --device cpu --partition-backend cpu --emulate-sm-share --admin-token-file T &
    python bench/profile_engine.py --url http://127.0.0.1:8000 --admin-token-file T --json cpu-profile.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gpu_common import EXIT_OK, int_list, write_json
from semipd.sim.models import Profile
from sm_sweep import Row, Target, sweep, table

PROG = "profile_engine"
TOKEN_IDS = range(10, 250)      # ids every tokenizer has; the content does not change a step's cost


class EngineError(RuntimeError):
    pass


class EngineClient:
    def __init__(self, url: str, token: str | None, timeout: float):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        try:
            models = self.http.get("/v1/models").raise_for_status().json()["data"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise EngineError(f"no OpenAI server at {url}: {exc}") from None
        self.model = models[0]["id"]
        self.max_model_len = models[0].get("max_model_len")

    def steps(self) -> dict[str, tuple[float, float, float]]:
        """phase -> (seconds summed, steps, tokens) since the engine started."""
        text = self.http.get("/metrics").raise_for_status().text
        out = {"prefill": [0.0, 0.0, 0.0], "decode": [0.0, 0.0, 0.0], "ttft": [0.0, 0.0, 0.0]}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "vllm:time_to_first_token_seconds_sum":
                    out["ttft"][0] += s.value
                elif s.name == "vllm:time_to_first_token_seconds_count":
                    out["ttft"][1] += s.value
                phase = s.labels.get("phase")
                if phase not in out:
                    continue
                if s.name == "semipd:step_seconds_sum":
                    out[phase][0] += s.value
                elif s.name == "semipd:step_seconds_count":
                    out[phase][1] += s.value
                elif s.name == "semipd:step_tokens_total":
                    out[phase][2] += s.value
        return {k: tuple(v) for k, v in out.items()}

    def partition(self) -> dict:
        return self._admin("GET")

    def set_split(self, prefill_sms: int) -> dict:
        return self._admin("PUT", {"prefill": prefill_sms})

    def _admin(self, method: str, body: dict | None = None) -> dict:
        r = self.http.request(method, "/admin/partition", json=body)
        if r.status_code == 401:
            raise EngineError("the admin API refused the token (give --admin-token-file or SEMIPD_ADMIN_TOKEN)")
        if r.status_code == 409:
            raise EngineError("the engine's split has another owner: serve with --partition-policy external")
        if r.status_code >= 400:
            raise EngineError(f"{method} /admin/partition: {r.status_code} {r.text[:200]}")
        return r.json()

    def complete(self, prompt_len: int, max_tokens: int) -> None:
        prompt = [TOKEN_IDS[i % len(TOKEN_IDS)] for i in range(prompt_len)]
        r = self.http.post("/v1/completions", json={"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                                                    "ignore_eos": True, "temperature": 0})
        if r.status_code != 200:
            raise EngineError(f"completion refused: {r.status_code} {r.text[:200]}")


def delta(before: dict, after: dict, phase: str) -> tuple[float | None, int, float]:
    """(mean step ms, steps, mean tokens per step) of one phase between two snapshots."""
    seconds, steps, tokens = (a - b for a, b in zip(after[phase], before[phase]))
    if steps <= 0:
        return None, 0, 0.0
    return 1000.0 * seconds / steps, int(steps), tokens / steps


class DecodeBatch:
    """B streaming requests decoding together; `ready` once all have their first token, `ended` once one is done."""

    def __init__(self, client: EngineClient, batch: int, context: int, max_tokens: int):
        self.ready = threading.Barrier(batch + 1)
        self.ended = threading.Event()
        self.stop = threading.Event()
        prompt = [TOKEN_IDS[i % len(TOKEN_IDS)] for i in range(context)]
        body = {"model": client.model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0, "stream": True}
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._one, args=(client, body), daemon=True) for _ in range(batch)]
        for t in self.threads:
            t.start()

    def _one(self, client: EngineClient, body: dict):
        first = True
        try:
            with client.http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    self.errors.append(f"{r.status_code}")
                    self.ready.abort()
                    return
                for line in r.iter_lines():
                    if first and line.startswith("data: {"):
                        first = False
                        self.ready.wait()
                    if self.stop.is_set():
                        return           # closing the stream aborts the request in the engine
        except (httpx.HTTPError, threading.BrokenBarrierError) as exc:
            self.errors.append(str(exc))
            self.ready.abort()
        finally:
            self.ended.set()

    def wait_ready(self, timeout: float):
        try:
            self.ready.wait(timeout)
        except threading.BrokenBarrierError:
            raise EngineError(f"decode batch did not start: {self.errors[:3]}") from None

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join()


class PrefillFlood:
    """Back-to-back one-token completions of N tokens from two clients, so the prefill worker is never idle."""

    def __init__(self, client: EngineClient, tokens: int, clients: int = 2):
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(client, tokens), daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, client: EngineClient, tokens: int):
        while not self.stop.is_set():
            client.complete(tokens, 1)

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join()


class EngineMeasure:
    """sm_sweep's measuring interface (`alone`, `together`) over a running engine's metrics."""

    def __init__(self, client: EngineClient, context: int, decode_tokens: int, repeats: int, min_window_s: float):
        self.client = client
        self.context = context
        self.decode_tokens = decode_tokens
        self.repeats = repeats
        self.min_window_s = min_window_s
        self.decode_context: dict[tuple[str, int], float] = {}
        self.api_overhead_ms: list[float] = []      # a request's time outside its prefill step, idle engine

    def _on(self, t: Target):
        if t.label != "current":
            self.client.set_split(t.prefill_sms)

    def alone(self, t: Target, phase: str, size: int):
        self._on(t)
        if phase == "prefill":
            self.client.complete(size, 1)                       # warm-up
            before = self.client.steps()
            started = time.monotonic()
            for _ in range(self.repeats):
                self.client.complete(size, 1)
            wall_ms = 1000.0 * (time.monotonic() - started) / self.repeats
            ms, steps, _ = delta(before, self.client.steps(), "prefill")
            if ms is not None:
                self.api_overhead_ms.append(wall_ms - ms * steps / self.repeats)
            return ms, f"engine metrics, {steps} steps"
        ms, steps, batch = self._decode_window(t, size, None)
        return ms, f"engine metrics, {steps} steps, mean batch {batch:.1f}"

    def together(self, t: Target, tokens: int, batch: int):
        self._on(t)
        return self._decode_window(t, batch, tokens, both=True)

    def _decode_window(self, t: Target, batch: int, prefill_tokens: int | None, both: bool = False):
        decode = DecodeBatch(self.client, batch, self.context, self.decode_tokens)
        flood = None
        try:
            decode.wait_ready(timeout=120)
            if prefill_tokens is not None:
                flood = PrefillFlood(self.client, prefill_tokens)
                time.sleep(0.2)
            before = self.client.steps()
            started = time.monotonic()
            decode.ended.wait(timeout=300)
            after = self.client.steps()
            if time.monotonic() - started < self.min_window_s:
                print(f"{PROG}: note: a window of only {time.monotonic() - started:.2f} s (raise --decode-tokens)",
                      file=sys.stderr)
        finally:
            if flood is not None:
                flood.close()
            decode.close()
        d_ms, d_steps, d_batch = delta(before, after, "decode")
        self.decode_context[(t.label, batch)] = self.context + self.decode_tokens / 2
        if not both:
            return d_ms, d_steps, d_batch
        p_ms, p_steps, _ = delta(before, after, "prefill")
        return p_ms, d_ms, p_steps, d_steps


def calibrate(client: EngineClient, url: str, rows: list[Row], meta: dict, args) -> dict:
    """One serving run per --calibration-rates; the factors and the overhead are their means (one busy
    machine varies by tens of percent from one run to the next, and the light and the heavy run weigh the two
    sides of each blend differently)."""
    runs = [calibrate_at_rate(client, url, rows, meta, args, rate) for rate in args.calibration_rates]
    keys = ("prefill_factor", "decode_factor", "api_overhead_ms")
    out = {k: round(sum(r[k] for r in runs) / len(runs), 4) for k in keys}
    out["runs"] = runs
    return out


def calibrate_at_rate(client: EngineClient, url: str, rows: list[Row], meta: dict, args, rate: float) -> dict:
    """One serving run (`semipd bench`, its own seed and rate, not a trace the profile is later judged on): the
    engine's mean step per phase under real load against what the rows predict for the same mean step, and what
    the client sees beyond the engine's own TTFT. Each prediction blends the alone and with-other rows by the
    share of the run the other phase was busy."""
    state = client.partition()
    p_share, d_share = state["prefill_sms"] / state["total_sms"], state["decode_sms"] / state["total_sms"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "calibration.json")
        before = client.steps()
        cmd = [sys.executable, "-m", "semipd.runtime.cli", "bench", "--url", url, "--rate", str(rate),
               "--num-requests", str(args.calibration_requests), "--seed", str(args.calibration_seed),
               "--input-len", args.calibration_input_len, "--output-len", args.calibration_output_len,
               "--no-progress", "--output", out]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise EngineError(f"the calibration run failed: {done.stderr.strip()[-300:]}")
        after = client.steps()
        run = json.loads(open(out).read())["runs"][0]
    summary, requests = run["summary"], run["requests"]
    wall = summary["duration_s"]
    model = Profile({"meta": meta, "rows": [asdict(r) for r in rows]})
    p_ms, p_steps, p_tokens = delta(before, after, "prefill")
    d_ms, d_steps, d_batch = delta(before, after, "decode")
    if not p_steps or not d_steps:
        raise EngineError("the calibration run took no prefill or no decode step")
    busy_p = (after["prefill"][0] - before["prefill"][0]) / wall
    busy_d = (after["decode"][0] - before["decode"][0]) / wall
    chunk = [(max(1, round(p_tokens)), 0)]
    predicted_p = ((1 - busy_d) * model.prefill(chunk, p_share) + busy_d * model.prefill(chunk, p_share, True))
    batch = max(1, round(d_batch))
    ok = [r for r in requests if r.get("error") is None]
    per_seq = sum(r["prompt_tokens"] + r["output_tokens"] / 2 for r in ok) / max(1, len(ok))
    ctx = round(batch * per_seq)
    predicted_d = ((1 - busy_p) * model.decode(batch, ctx, d_share) + busy_p * model.decode(batch, ctx, d_share, True))
    engine_ttft = (after["ttft"][0] - before["ttft"][0]) / max(1.0, after["ttft"][1] - before["ttft"][1])
    return {
        "prefill_factor": round(p_ms / 1000 / predicted_p, 4),
        # the client's token gap, not the step: it carries what the engine does between two decode steps too
        "decode_factor": round(summary["itl_s"]["mean"] / predicted_d, 4),
        "api_overhead_ms": round(max(0.0, summary["ttft_s"]["mean"] - engine_ttft) * 1000, 3),
        "run": {"rate": rate, "requests": args.calibration_requests, "seed": args.calibration_seed,
                "input_len": args.calibration_input_len, "output_len": args.calibration_output_len,
                "prefill_sms": state["prefill_sms"], "mean_prefill_step_ms": round(p_ms, 3),
                "mean_prefill_tokens": round(p_tokens, 1), "mean_decode_batch": round(d_batch, 2),
                "client_itl_mean_ms": round(summary["itl_s"]["mean"] * 1000, 3),
                "client_ttft_mean_ms": round(summary["ttft_s"]["mean"] * 1000, 3),
                "engine_ttft_mean_ms": round(engine_ttft * 1000, 3), "prefill_busy": round(busy_p, 3),
                "decode_busy": round(busy_d, 3)},
    }


def targets(client: EngineClient, splits: list[int] | None) -> list[Target]:
    if not splits:
        state = client.partition()
        return [Target("current", state["prefill_sms"], state["decode_sms"])]
    total = client.partition()["total_sms"]
    return [Target(f"split {p}", p, total - p) for p in splits]


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the engine's base URL")
    p.add_argument("--admin-token-file", help="the engine's admin token (or set SEMIPD_ADMIN_TOKEN)")
    p.add_argument("--splits", type=int_list, help="prefill SMs to profile (default: only the current split)")
    p.add_argument("--tokens", type=int_list, default=[32, 128, 256, 512], help="prefill sizes (tokens)")
    p.add_argument("--batches", type=int_list, default=[1, 4, 16, 32], help="decode batch sizes")
    p.add_argument("--partner-tokens", type=int, default=256, help="prefill size running against decode rows")
    p.add_argument("--partner-batch", type=int, default=8, help="decode batch running against prefill rows")
    p.add_argument("--context", type=int, default=64, help="prompt tokens of each decoding request")
    p.add_argument("--decode-tokens", type=int, default=160, help="output tokens of each decoding request")
    p.add_argument("--repeats", type=int, default=5, help="prefill steps measured per size")
    p.add_argument("--no-concurrent", action="store_true", help="skip the rows with the other phase busy")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per HTTP request")
    p.add_argument("--calibrate", action="store_true",
                   help="then serve one Poisson run through semipd bench and store in meta['calibration'] how much "
                        "slower each phase steps under real load than the rows predict, and the API's own overhead")
    p.add_argument("--calibrate-at", type=int, help="prefill SMs of the calibration run (default: the last split)")
    p.add_argument("--calibration-rates", type=lambda t: [float(x) for x in t.split(",")], default=[3.0, 6.0],
                   help="requests/s of the calibration runs")
    p.add_argument("--calibration-requests", type=int, default=150, help="requests per calibration run")
    p.add_argument("--calibration-seed", type=int, default=1000, help="not a seed the profile is judged on")
    p.add_argument("--calibration-input-len", default="lognormal:128:0.6:16:480")
    p.add_argument("--calibration-output-len", default="uniform:16:64")
    p.add_argument("--json", help="write the profile here (sm_sweep's format)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    token = None
    if args.admin_token_file:
        token = open(args.admin_token_file).read().strip()
    token = token or os.environ.get("SEMIPD_ADMIN_TOKEN")
    try:
        client = EngineClient(args.url, token, args.timeout)
        plan = targets(client, args.splits)
        measure = EngineMeasure(client, args.context, args.decode_tokens, args.repeats, min_window_s=0.2)
        started = time.monotonic()
        rows = sweep(measure, plan, args.tokens, args.batches, args.partner_tokens, args.partner_batch,
                     not args.no_concurrent)
    except (EngineError, httpx.HTTPError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    rows = [replace(r, context=round(measure.decode_context.get((r.target, r.size), args.context)))
            if r.phase == "decode" else r for r in rows]
    meta = {"device": "semipd engine (its own step-time metrics)", "sms": client.partition()["total_sms"],
            "context": args.context + args.decode_tokens // 2, "workload": client.model, "url": args.url,
            "source": "engine /metrics: semipd:step_seconds, semipd:step_tokens", "repeats": args.repeats,
            "api_overhead_ms": round(statistics.median(measure.api_overhead_ms), 3) if measure.api_overhead_ms
            else None,
            "seconds": round(time.monotonic() - started, 1)}
    if args.calibrate:
        try:
            if args.calibrate_at:
                client.set_split(args.calibrate_at)
            meta["calibration"] = calibrate(client, args.url, rows, meta, args)
        except (EngineError, httpx.HTTPError) as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 1
        cal = meta["calibration"]
        print(f"calibration (serving runs at {args.calibration_rates} req/s): prefill x{cal['prefill_factor']:.2f}, "
              f"decode x{cal['decode_factor']:.2f}, API overhead {cal['api_overhead_ms']:.1f} ms per request")
    print(f"{meta['device']}, model {client.model}, decode context ~{meta['context']} tokens")
    print(table(rows))
    write_json(args.json, {"meta": meta, "rows": [asdict(r) | {"slowdown": r.slowdown} for r in rows]})
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
