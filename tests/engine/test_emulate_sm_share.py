"""--emulate-sm-share, the cpu backend's stand-in for SM isolation: a step that computed t seconds on share s of
the SMs waits t*(1/s - 1) more. Moving SMs to prefill must lower prefill step time and raise decode step time.

Checked first on the wait the emulation computed per step (prefill: 3.1 vs 0.375 times its compute, about 8x
apart), then on wall time in direction only, with a generous margin: 3x is expected between prefill=0.25 and
0.75 (132/32 vs 132/96) and the check asks 1.5x. The rounds are interleaved so a machine slowing down mid-test
hits both splits alike. The exact formula is unit-tested (tests/unit/test_engine_modes.py)."""
import httpx
import pytest

pytestmark = pytest.mark.engine

TOKEN = "emulation-token-0c4d"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = list(range(10, 330))           # 320 tokens: one prefill step under the 512-token budget
ROUNDS, REQUESTS = 3, 4


def sums(server, read_metric, phase):
    def read(name):
        try:
            return read_metric(server, name, phase=phase)
        except KeyError:               # a phase's series appears with its first step
            return 0.0
    return (read("semipd:step_seconds_sum"), read("semipd:step_seconds_count"),
            read("semipd:emulated_wait_seconds_total"))


def run_round(server, read_metric, fraction, totals):
    r = httpx.put(server.url + "/admin/partition", headers=AUTH, json={"prefill": fraction}, timeout=30)
    assert r.status_code == 200, r.text
    share = {"prefill": r.json()["prefill_sms"] / 132, "decode": r.json()["decode_sms"] / 132}
    before = {phase: sums(server, read_metric, phase) for phase in share}
    for _ in range(REQUESTS):          # one at a time: every step has the same shape in both splits
        out = httpx.post(server.url + "/v1/completions", timeout=120,
                         json={"prompt": PROMPT, "max_tokens": 6, "ignore_eos": True})
        assert out.status_code == 200, out.text
    for phase in share:
        seconds, steps, wait = (a - b for a, b in zip(sums(server, read_metric, phase), before[phase]))
        assert steps > 0 and 0 < wait < seconds, (phase, fraction)     # the wait is part of the step's time
        total = totals.setdefault((fraction, phase), [0.0, 0.0, 0.0])
        total[0] += seconds
        total[1] += steps
        total[2] += wait


def test_moving_sms_to_prefill_speeds_prefill_and_slows_decode(start_server, read_metric):
    server = start_server("--device", "cpu", "--partition-backend", "cpu", "--emulate-sm-share",
                          env={"SEMIPD_ADMIN_TOKEN": TOKEN})
    totals = {}
    for _ in range(ROUNDS):
        for fraction in (0.25, 0.75):
            run_round(server, read_metric, fraction, totals)
    mean = {key: seconds / steps for key, (seconds, steps, _) in totals.items()}
    wait = {key: waited / steps for key, (_, steps, waited) in totals.items()}
    print("mean step seconds:", {f"{p}@{f}": round(v, 4) for (f, p), v in mean.items()},
          "of which emulated:", {f"{p}@{f}": round(v, 4) for (f, p), v in wait.items()})
    assert wait[(0.25, "prefill")] > 1.5 * wait[(0.75, "prefill")], wait
    assert wait[(0.75, "decode")] > 1.5 * wait[(0.25, "decode")], wait
    assert mean[(0.25, "prefill")] > 1.5 * mean[(0.75, "prefill")], mean
    assert mean[(0.75, "decode")] > 1.5 * mean[(0.25, "decode")], mean
