"""Everything GPU-specific, proved and measured in one device call, in priority order, within a time budget.

    PYTHONUNBUFFERED=1 python3 bench/gpu/suite.py --wheels .whl --out "$OUT"      # on the GPU machine
    python bench/gpu/suite.py --dry-run --wheels DIR --out DIR                    # CPU: same paths, tiny shapes

Stages (each in its own process group with its own time cap, so a failure or a hang never stops the next):
  wheels   install the carried wheels into --site and check they landed (bench/gpu/prepare.sh downloads them)
  env      a) torch, triton, CUDA, driver, SMs, HBM bandwidth from a 2 GiB device-to-device copy, green contexts
  pytest   b) pytest -m gpu tests/gpu (disjoint SMs, greedy tokens equal on green contexts and shared streams)
  kernels  c) compiled Triton kernels against their torch references at Llama-3-8B shapes in bf16, then
              bench/bench_kernels.py for achieved bandwidth as a share of the measured copy bandwidth
  parity   d) `semipd serve` (bf16, CUDA) over HTTP against transformers (bf16, CUDA): greedy tokens
  sweep    e) bench/sm_sweep.py: prefill and decode latency against SM count, alone and concurrent
  switch   f) bench/switch_latency.py: split switches through the engine under load (goal p99 < 1 ms, 0 failed)
  engine   g) throughput/TTFT/TPOT against transformers generate, decode step time against the roofline
  compare  h) bench/compare.py modes: the engine unified / static split / SLO policy through semipd bench

$OUT gets suite.json (every stage's status and result, rewritten after each stage), suite.log (every stage's
output), and the scripts' own JSON: kernels.json, sm_profile.json (sm_sweep's format, the profile a later
`semipd simulate` reads), switch.json. At most 8 files, as the device tool returns. The table comes last.
Exit 0 when no stage failed or timed out, else 1.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PY = sys.executable
RESERVE_S = 5.0  # kept back for the summary and the table
# The distributions prepare.sh downloads, by the name their dist-info folder carries.
WHEELS = ("fastapi", "starlette", "pydantic", "pydantic_core", "annotated_types", "typing_inspection",
          "typing_extensions", "uvicorn", "opentelemetry_api", "xgrammar", "apache_tvm_ffi")


@dataclass
class Stage:
    name: str
    what: str
    max_s: float                 # its cap, when the budget has that much left
    min_s: float                 # with less than this left it is skipped
    record: dict = field(default_factory=dict)


STAGES = [
    Stage("wheels", "carried wheels installed", 60, 5),
    Stage("env", "a) torch/CUDA/driver/SMs, copy bandwidth", 60, 10),
    Stage("pytest", "b) pytest -m gpu tests/gpu", 150, 30),
    Stage("kernels", "c) Triton kernels vs references, bandwidth", 120, 20),
    Stage("parity", "d) greedy parity vs transformers (HTTP)", 90, 20),
    Stage("sweep", "e) SM sweep profile", 120, 30),
    Stage("switch", "f) split switch latency under load", 90, 20),
    Stage("engine", "g) throughput vs transformers, decode roofline", 150, 40),
    Stage("compare", "h) bench/compare.py modes: unified, static, slo through semipd bench", 150, 40),
]


class Suite:
    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="semipd-suite-"))
        self.site = Path(args.site) if args.site else self.scratch / "site"
        self.log = open(self.out / "suite.log", "ab")
        self.started = time.monotonic()
        self.child = None
        self.audit = self.scratch / "imports.txt"
        self.env = self._stage_env()
        self.summary = {"suite": {"dry_run": self.dry, "budget_s": args.budget_s, "argv": sys.argv[1:],
                                  "python": sys.version.split()[0], "commit": _commit(), "out": str(self.out),
                                  "started_unix": time.time()},
                        "stages": []}

    def _stage_env(self) -> dict:
        """Every stage sees the carried wheels (on the GPU; on CPU the cp312 wheels cannot load, and this
        machine has the packages anyway) and semipd through a folder of links to this checkout (no pip build on
        a machine without network). The dry run also records what each process imports."""
        shim = self.scratch / "pkgs"
        (shim / "semipd").mkdir(parents=True)
        for part in ("runtime", "kernels", "operator"):
            (shim / "semipd" / part).symlink_to(ROOT / part, target_is_directory=True)
        paths = ([] if self.dry else [str(self.site)]) + [str(shim)]
        # temporary files of the stages (models, server logs) go to the scratch folder, removed at the end
        env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(self.scratch))
        if self.dry:
            paths.insert(0, str(HERE / "audit"))
            env["SEMIPD_IMPORT_AUDIT"] = str(self.audit)
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
        return env

    # ---- running one stage ------------------------------------------------------------------------------

    def remaining(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started) - RESERVE_S

    def run(self, stage: Stage):
        left = self.remaining()
        rec = stage.record = {"name": stage.name, "what": stage.what, "status": "skipped", "reason": "",
                              "seconds": 0.0}
        if self.args.only and stage.name not in self.args.only:
            rec["reason"] = "not in --only"
            return
        if left < stage.min_s:
            rec["reason"] = f"budget: {max(0, left):.0f} s left, it needs at least {stage.min_s:.0f} s"
            return
        cap = min(stage.max_s, left)
        rec["cap_s"] = round(cap, 1)
        start = time.monotonic()
        self._log(f"\n===== {stage.name}: {stage.what} (cap {cap:.0f} s) =====\n")
        offset = self.log.tell()
        try:
            getattr(self, f"stage_{stage.name}")(rec, cap)
        except subprocess.TimeoutExpired:
            rec.update(status="timeout", reason=f"stopped at its {cap:.0f} s cap")
        except Exception as exc:  # the suite goes on: one broken stage must not cost the others
            rec.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
        rec["seconds"] = round(time.monotonic() - start, 1)
        print(f"[{stage.name}] {rec['status']} in {rec['seconds']:.0f} s{': ' + rec['reason'] if rec['reason'] else ''}",
              flush=True)
        if rec["status"] in ("failed", "timeout"):
            self.log.flush()
            tail = (self.out / "suite.log").read_bytes()[offset:].decode(errors="replace").splitlines()[-15:]
            print("\n".join("    " + line for line in tail), flush=True)

    def _log(self, text: str):
        self.log.write(text.encode())
        self.log.flush()

    def sub(self, argv: list[str], cap: float) -> int:
        """Run argv with its output into suite.log, in its own process group so a timeout also ends whatever it
        started (servers); raises TimeoutExpired at the cap."""
        self._log("$ " + " ".join(argv) + "\n")
        self.child = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                      process_group=0)
        try:
            return self.child.wait(timeout=cap)
        except BaseException:  # its cap, or the suite itself being stopped
            self.kill_child()
            raise
        finally:
            self.child = None

    def kill_child(self):
        child = self.child
        if child is None or child.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(child.pid, sig)
                child.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return

    def worker(self, rec: dict, cap: float, name: str, *extra: str) -> dict:
        """A stage of bench/gpu/stages.py: its JSON is kept even when the cap cut it short."""
        result = self.scratch / f"{name}.json"
        argv = [PY, str(HERE / "stages.py"), name, "--result", str(result), *extra]
        try:
            rc = self.sub(argv + (["--dry-run"] if self.dry else []), cap)
        finally:
            data = json.loads(result.read_text()) if result.exists() else {}
            rec["result"] = data
        reason = data.pop("reason", "")
        rec.update(status="ok" if rc == 0 else "failed", reason=reason or ("" if rc == 0 else f"exit {rc}"))
        return data

    # ---- the stages ---------------------------------------------------------------------------------------

    def stage_wheels(self, rec: dict, cap: float):
        wheels = sorted(Path(self.args.wheels).glob("*.whl")) if self.args.wheels else []
        if not wheels:
            rec["reason"] = "no --wheels folder with wheels: the stages that serve HTTP will fail without fastapi"
            return
        argv = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                "--upgrade", "--target", str(self.site)]
        if self.dry:  # this Python is not 3.12: let pip accept the device's cp312 wheels all the same
            argv += ["--python-version", "3.12", "--only-binary=:all:"]
        rc = self.sub(argv + [str(w) for w in wheels], cap)
        landed = {p.name.split("-")[0].lower() for p in self.site.glob("*.dist-info")}
        missing = sorted(set(WHEELS) - landed)
        rec["result"] = {"wheels": [w.name for w in wheels], "bytes": sum(w.stat().st_size for w in wheels),
                         "site": str(self.site), "landed": sorted(landed), "missing": missing}
        if rc or missing:
            rec.update(status="failed", reason=f"pip exit {rc}" if rc else f"not installed: {', '.join(missing)}")
            return
        if not self.dry:  # on the device the wheels must also import under its Python
            rc = self.sub([PY, "-c", "import fastapi, uvicorn, pydantic, starlette, semipd.runtime.server"], cap)
            if rc:
                rec.update(status="failed", reason="the installed wheels do not import (see suite.log)")
                return
        rec["status"] = "ok"

    def stage_env(self, rec, cap):
        data = self.worker(rec, cap, "env")
        self.hbm_gbps = data.get("hbm_gbps")

    def stage_pytest(self, rec, cap):
        xml = self.scratch / "pytest.xml"
        # no schemathesis plugin: installed here for the engine tier, pytest would load it (and the import
        # audit report it) although no GPU test uses it and the device does not have it
        rc = self.sub([PY, "-m", "pytest", "-m", "gpu", "tests/gpu", "-v", "-p", "no:cacheprovider",
                       "-p", "no:schemathesis", f"--junitxml={xml}", "-o", f"timeout={int(cap)}"], cap)
        rec["result"] = counts = _junit(xml)
        if rc == 0 and not self.dry and counts.get("passed", 0) == 0:
            rec.update(status="failed", reason="no GPU test passed")
        elif rc == 0:
            rec.update(status="ok", reason="all skipped: no GPU (dry run)" if self.dry else "")
        else:
            rec.update(status="failed", reason=f"pytest exit {rc}: {counts.get('failed', 0)} failed, "
                                               f"{counts.get('errors', 0)} errors")

    def stage_kernels(self, rec, cap):
        self.worker(rec, cap, "kernels", "--bench-json", str(self.out / "kernels.json"))

    def stage_parity(self, rec, cap):
        self.worker(rec, cap, "parity")

    def stage_sweep(self, rec, cap):
        path = self.out / "sm_profile.json"
        argv = [PY, "bench/sm_sweep.py", "--json", str(path)]
        # a few splits across the range, tokens and batches as the script's defaults: tens of seconds per split
        argv += ["--dry-run", "--splits", "8,64"] if self.dry else ["--splits", "16,48,80,112", "--iters", "5",
                                                                      "--warmup", "2"]
        rc = self.sub(argv, cap)
        rows = json.loads(path.read_text())["rows"] if path.exists() else []
        rec["result"] = {"file": path.name, "rows": len(rows), "format": "bench/sm_sweep.py --json"}
        rec.update(status="ok" if rc == 0 and rows else "failed", reason="" if rc == 0 else f"exit {rc}")

    def stage_switch(self, rec, cap):
        path = self.out / "switch.json"
        argv = [PY, "bench/switch_latency.py", "--json", str(path)]
        argv += (["--dry-run", "--switches", "2", "--dwell", "0", "--decode-requests", "2", "--prompt-len", "8"]
                 if self.dry else ["--switches", "30", "--dwell", "0.1"])
        rc = self.sub(argv, cap)
        data = json.loads(path.read_text()) if path.exists() else {}
        engine = data.get("engine_switch", {})
        ms = sorted(s["metric_ms"] for s in engine.get("samples", []) if s["metric_ms"] is not None)
        p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else None
        errors = engine.get("load_errors")
        rec["result"] = {"file": path.name, "switches": len(ms), "p50_ms": ms[len(ms) // 2] if ms else None,
                         "p99_ms": p99, "failed_requests": errors, "mean_step_ms": engine.get("mean_step_ms"),
                         "goal": "p99 < 1 ms and 0 failed requests",
                         "goal_met": p99 is not None and p99 < 1.0 and errors == 0}
        rec.update(status="ok" if rc == 0 and ms else "failed", reason="" if rc == 0 else f"exit {rc}")

    def stage_engine(self, rec, cap):
        extra = ["--hbm-gbps", str(self.hbm_gbps)] if getattr(self, "hbm_gbps", None) else []
        # the model is cached outside the scratch folder on the GPU, so a rerun on a warm machine skips writing it
        extra += [] if self.dry else ["--cache-dir", "/tmp/semipd-gpu-suite"]
        data = self.worker(rec, cap, "engine", *extra)
        at64 = [r for r in data.get("decode_steps", []) if r["batch"] == 64]
        if at64:
            data["goal"] = "decode step within 1.3x of the roofline at batch 64"
            data["goal_met"] = at64[0]["vs_roofline"] <= 1.3

    def stage_compare(self, rec, cap):
        """The engine in its three modes (unified shared streams, a static green-context split, the in-engine
        SLO policy) over one rate sweep through `semipd bench`: bench/compare.py modes, the CPU comparison's
        command with green contexts instead of the stand-in. The dry run takes one short rate of two modes."""
        out = Path(tempfile.gettempdir()) / "semipd-gpu-suite" / "compare"     # per-request JSON: too big to carry
        shutil.rmtree(out, ignore_errors=True)
        plan = (["--device", "cpu", "--modes", "unified", "static", "--rate-sweep", "4:4:1", "--duration", "3"]
                if self.dry else ["--device", "cuda", "--rate-sweep", "4:16:4", "--duration", "8"])
        argv = [PY, str(ROOT / "bench" / "compare.py"), "modes", "--out", str(out), "--slo-ttft", "0.3",
                "--slo-tpot", "0.015", *plan, *self.args.compare_arg]
        rc = self.sub(argv, cap)
        rec.update(status="ok" if rc == 0 else "failed", reason="" if rc == 0 else f"exit {rc}")
        rec["result"] = {p.stem: compare_summary(json.loads(p.read_text())) for p in sorted(out.glob("*.json"))}
        if (out / "cpu-modes.png").exists():
            shutil.copy(out / "cpu-modes.png", self.out / "compare.png")

    # ---- results ------------------------------------------------------------------------------------------

    def write(self):
        self.summary["stages"] = [s.record for s in STAGES if s.record]
        self.summary["suite"]["elapsed_s"] = round(time.monotonic() - self.started, 1)
        if self.dry and self.audit.exists():
            self.summary["import_audit"] = import_audit(self.audit)
        tmp = self.out / "suite.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
        os.replace(tmp, self.out / "suite.json")

    def table(self) -> str:
        lines = [f"{'stage':<8} {'status':<8} {'s':>5}  headline"]
        for s in STAGES:
            r = s.record
            if r:
                lines.append(f"{s.name:<8} {r['status']:<8} {r['seconds']:>5.0f}  {headline(s.name, r)}"[:160])
        return "\n".join(lines)


def compare_summary(doc: dict) -> dict:
    """What comes back of one mode's semipd bench JSON: per rate its attainment and percentiles, no requests."""
    def ms(stats, q):
        return None if stats.get(q) is None else round(stats[q] * 1000, 2)
    return {"label": doc.get("label"), "engine_command": doc.get("engine_command"),
            "max_rate_at_goal": doc.get("max_rate_at_goal"), "split_moves": len(doc.get("split_moves", [])),
            "moves": doc.get("split_moves", [])[:20],
            "runs": [{"rate": r["rate"], "attainment": r["summary"]["attainment"],
                      "ttft_p90_ms": ms(r["summary"]["ttft_s"], "p90"), "tpot_p90_ms": ms(r["summary"]["tpot_s"], "p90"),
                      "output_throughput": r["summary"]["output_throughput"]} for r in doc.get("runs", [])]}


def headline(name: str, rec: dict) -> str:
    """One line of what the stage found (the JSON holds everything)."""
    r = rec.get("result") or {}
    try:
        if rec["status"] == "skipped" or not r:
            return rec["reason"]
        if name == "wheels":
            return f"{len(r['wheels'])} wheels, {r['bytes'] / 2**20:.1f} MiB, missing: {r['missing'] or 'none'}"
        if name == "env":
            return (f"{r.get('device')} {r.get('sms')} SMs, torch {r.get('torch')}, triton {r.get('triton')}, "
                    f"driver {r.get('driver', '-')}, copy {r.get('hbm_gbps', 0):.0f} GB/s")
        if name == "pytest":
            return ", ".join(f"{k} {v}" for k, v in r.items() if k != "failures") + (
                f"; first failure: {r['failures'][0]}" if r.get("failures") else "")
        if name == "kernels":
            bad = [c for c in r.get("checks", []) if not c["ok"]]
            bw = ", ".join(f"{k} {100 * v['best_hbm_frac']:.0f}%" for k, v in r.get("bandwidth", {}).items())
            return f"{len(r.get('checks', [])) - len(bad)}/{len(r.get('checks', []))} within tolerance; HBM {bw}"
        if name == "parity":
            return (f"prefix agreement {r['prefix_agreement']:.1%}, same position {r['same_position_share']:.1%}, "
                    f"{r['exact_prompts']}/{r['prompts']} prompts identical")
        if name == "sweep":
            return f"{r['rows']} rows in {r['file']}"
        if name == "switch":
            return (f"{r['switches']} switches, p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, failed "
                    f"requests {r['failed_requests']}, goal (p99 < 1 ms, 0 failed) met: {r['goal_met']}")
        if name == "compare":
            return ", ".join(f"{k}: {v['max_rate_at_goal']} req/s at goal, {v['split_moves']} moves"
                             for k, v in r.items())
        if name == "engine":
            steps = " ".join(f"B={s['batch']} {s['vs_roofline']:.2f}x" for s in r.get("decode_steps", []))
            tput = f", semipd/transformers {r['throughput_ratio']:.2f}x" if "throughput_ratio" in r else ""
            goal = f", goal (<= 1.3x at B=64) met: {r['goal_met']}" if "goal_met" in r else ""
            return f"decode step / roofline {steps}{goal}{tput}"
    except (KeyError, TypeError, ValueError):
        pass
    return rec["reason"]


def _junit(path: Path) -> dict:
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failures"] = [f"{case.get('name')}: {(bad.get('message') or '')[:200]}"
                          for case in suite.iter("testcase") for bad in case
                          if bad.tag in ("failure", "error")]
    counts["failed"] = len(counts["failures"])
    return counts


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# Imported here only because this machine has them, and used only when present (try/except ImportError).
OPTIONAL = {"orjson": "fastapi's faster JSON", "sniffio": "anyio's async-library detection",
            "trio": "httpcore's trio backend", "outcome": "trio's"}


def import_audit(path: Path) -> dict:
    """Which imported top-level modules come from a distribution that neither the GPU image nor the wheels
    provide. Left out: this checkout's modules, the standard library, OPTIONAL, and what the image's own packages
    require in the versions installed here (the image's versions bring their own requirements)."""
    allowed = {_norm(line) for line in (HERE / "image-packages.txt").read_text().splitlines()
               if line and not line.startswith("#")}
    allowed |= {_norm(w) for w in WHEELS} | {"semipd"}
    todo = list(allowed)
    while todo:  # close over requirements (markers with extras are optional, so not followed)
        try:
            requires = importlib.metadata.requires(todo.pop()) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for req in requires:
            name = _norm(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
            if "extra ==" not in req and name not in allowed:
                allowed.add(name)
                todo.append(name)
    owners = importlib.metadata.packages_distributions()
    modules = {m for m in path.read_text().split() if m not in sys.stdlib_module_names and m not in OPTIONAL}
    missing = {}
    for m in sorted(modules):
        dists = {_norm(d) for d in owners.get(m, [])}
        if dists and not dists & allowed:
            missing[m] = sorted(dists)
    return {"modules": len(modules), "missing": missing}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=500, help="seconds for all stages (one 9-minute call)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results" / "gpu"),
                   help="results folder (default $OUT, else bench/results/gpu)")
    p.add_argument("--wheels", help="folder of wheels to install first (bench/gpu/prepare.sh)")
    p.add_argument("--site", help="where the wheels go (default /tmp/site; a scratch folder on a dry run)")
    p.add_argument("--only", type=lambda s: s.split(","), help="comma-separated stages to run")
    p.add_argument("--compare-arg", action="append", default=[], help="more arguments for bench/compare.py modes")
    p.add_argument("--dry-run", action="store_true", help="CPU: the same code paths with tiny shapes")
    args = p.parse_args(argv)
    if args.site is None and not args.dry_run:
        args.site = "/tmp/site"
    suite = Suite(args)

    def stop(signum, frame):  # the device's limit or a ^C: keep what exists, end the stage's processes
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, stop)
    print(f"semipd GPU suite: budget {args.budget_s:.0f} s, results in {suite.out}"
          f"{' (DRY RUN: CPU, tiny shapes, nothing here measures a GPU)' if args.dry_run else ''}", flush=True)
    try:
        for stage in STAGES:
            suite.run(stage)
            suite.write()
    except KeyboardInterrupt:
        suite.kill_child()
        for stage in STAGES:
            if stage.record.get("status") == "skipped" and not stage.record.get("reason"):
                stage.record.update(status="timeout", reason="the suite was stopped during this stage")
            elif not stage.record:
                stage.record = {"name": stage.name, "what": stage.what, "status": "skipped",
                                "reason": "the suite was stopped", "seconds": 0.0}
    finally:
        signal.signal(signal.SIGTERM, previous)
    suite.write()
    shutil.rmtree(suite.scratch, ignore_errors=True)
    print("\n" + suite.table(), flush=True)
    bad = [s.name for s in STAGES if s.record.get("status") in ("failed", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
