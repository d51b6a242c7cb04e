"""The one `semipd` command: serve, bench, simulate, tiny-model, operator."""
import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

from semipd.runtime.config import (DEFAULT_CACHE_DIR, EngineConfig, ServerConfig, SloSettings, check_memory,
                                   check_partition_policy)


def _serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve a model over the OpenAI API (prefill and decode on their own SMs)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="Hugging Face model directory, or hf://ORG/NAME[@REVISION] to fetch from the "
                                   "Hub (default: the embedded tiny model, made once in the cache directory)")
    p.add_argument("--download-dir", default=str(DEFAULT_CACHE_DIR / "models"),
                   help="where hf:// models are fetched to (and found again on the next start)")
    p.add_argument("--served-model-name", help="name clients use in 'model' (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-model-len", type=int, help="context limit (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="decode batch limit")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="prefill token budget per step; longer prompts are chunked")
    p.add_argument("--max-num-waiting", type=int, default=256, help="queued requests before answering 503")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-kv-blocks", type=int, help="KV pool size in blocks (overrides --kv-cache-memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="CUDA: share of the GPU's memory this engine may use for weights, activations, CUDA graphs "
                        "and the KV pool, which gets what is left")
    p.add_argument("--kv-cache-memory", type=float,
                   help="KV pool in GiB, instead of what --gpu-memory-utilization leaves (default on CPU: 0.25)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of prompt prefixes already computed (full blocks of --block-size tokens)")
    p.add_argument("--kernel-backend", default="auto", choices=["auto", "triton", "torch"],
                   help="auto: Triton kernels on CUDA, torch references on CPU")
    p.add_argument("--partition-backend", default="auto", choices=["auto", "greenctx", "shared", "cpu"],
                   help="auto: green contexts on CUDA when the driver has them, else shared streams; cpu without GPU. "
                        "shared: no isolation, the unified baseline (on CUDA or CPU)")
    p.add_argument("--sm-split", help="initial split: prefill=N (SMs) or prefill=F (fraction, rounded to what the "
                                      "device allows)")
    p.add_argument("--partition-policy", default="external", choices=["external", "static", "slo"],
                   help="who moves the split: external: the admin API (PUT /admin/partition) and --partition-file "
                        "(an operator); static: nobody, the start-up split stays (PUT answers 409); slo: the "
                        "in-engine SLO policy on the engine's own measurements (needs --slo-ttft-ms and/or "
                        "--slo-tpot-ms; PUT answers 409)")
    p.add_argument("--partition-file", help="file to watch for the split (the downward-API projection of the pod "
                                            "annotation semipd.io/sm-partition); external policy only")
    p.add_argument("--emulate-sm-share", action="store_true",
                   help="cpu partition backend only: a named stand-in for SM isolation, not a partition. Each step "
                        "that computed t seconds on share s of the SMs waits t*(1/s - 1) more, so moving SMs to a "
                        "phase measurably speeds it up and slows the other, as on a GPU")
    slo = p.add_argument_group("in-engine SLO policy (--partition-policy slo)")
    slo.add_argument("--slo-ttft-ms", type=float, help="TTFT target in milliseconds at --slo-percentile")
    slo.add_argument("--slo-tpot-ms", type=float, help="TPOT target in milliseconds at --slo-percentile")
    slo.add_argument("--slo-percentile", type=float, default=90.0, help="percentile both targets are read at")
    slo.add_argument("--partition-min", type=float, default=0.1, help="smallest prefill share the policy sets")
    slo.add_argument("--partition-max", type=float, default=0.9, help="largest prefill share the policy sets")
    slo.add_argument("--partition-step", type=float, default=0.05, help="largest move of one feedback decision")
    slo.add_argument("--partition-cooldown", type=float, default=30.0, help="seconds between two split changes")
    slo.add_argument("--policy-interval", type=float, default=5.0, help="seconds between two decisions")
    slo.add_argument("--policy-window", type=float, default=30.0,
                     help="seconds of the engine's own measurements each decision reads")
    p.add_argument("--admin-token-file", help="bearer token for /admin/* (or set SEMIPD_ADMIN_TOKEN)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode eagerly on CUDA")
    p.add_argument("--cpu-compile", action="store_true",
                   help="CPU only: compile the decode forward with torch.compile (inductor) at start-up (tens of "
                        "seconds): fused paged attention and elementwise ops; ignored on CUDA")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--max-request-body-mib", type=float, default=16.0,
                   help="largest request body in MiB; larger ones are refused with 413 before they are read")
    p.add_argument("--torch-threads", type=int,
                   help="CPU only: torch threads per worker while prefill and decode both work; decode, while "
                        "prefill is idle, takes the cores left (default: half the cores)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the sampler of requests without their own 'seed': the same requests in the same "
                        "order sample the same tokens on a restarted server")
    p.add_argument("--tool-call-parser", default="auto", choices=["auto", "llama3_json", "hermes", "mistral"],
                   help="how tool calls are read from the model's reply; auto: by architecture (Llama: "
                        "llama3_json, Qwen: hermes, Mistral: mistral)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _admin_token(path: str | None) -> str | None:
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise SystemExit(f"semipd serve: cannot read --admin-token-file {path}: {exc.strerror}")
        if not token:
            raise SystemExit(f"semipd serve: --admin-token-file {path} is empty")
        return token
    return os.environ.get("SEMIPD_ADMIN_TOKEN") or None


def _refuse(message: str) -> int:
    """A flag combination that cannot work: one line and exit status 2, as argparse does for a bad flag."""
    print(f"semipd serve: error: {message}", file=sys.stderr)
    return 2


ENGINE_PACKAGES = ("torch", "transformers", "fastapi", "uvicorn", "xgrammar")


def missing_engine_packages() -> list[str]:
    """What `semipd serve` needs and an operator-only install (no `engine` extra) lacks."""
    missing = []
    for name in ENGINE_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:
            found = False
        if not found:
            missing.append(name)
    return missing


def serve(args) -> int:
    missing = missing_engine_packages()
    if missing:
        print(f"semipd serve: error: the engine is not installed here (missing {', '.join(missing)}); "
              f"install it with: pip install 'semipd[engine]'", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_config = EngineConfig(
        model=args.model, served_model_name=args.served_model_name, dtype=args.dtype, device=args.device,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_waiting=args.max_num_waiting,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=args.enable_prefix_caching,
        download_dir=args.download_dir,
        kernel_backend=args.kernel_backend, partition_backend=args.partition_backend, sm_split=args.sm_split,
        partition_file=args.partition_file, cuda_graphs=not args.no_cuda_graphs, seed=args.seed,
        cpu_compile=args.cpu_compile,
        torch_threads=args.torch_threads, partition_policy=args.partition_policy,
        emulate_sm_share=args.emulate_sm_share,
        slo=SloSettings(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms, percentile=args.slo_percentile,
                        partition_min=args.partition_min, partition_max=args.partition_max,
                        partition_step=args.partition_step, partition_cooldown=args.partition_cooldown,
                        interval=args.policy_interval, window=args.policy_window))
    try:
        check_partition_policy(engine_config)
        check_memory(engine_config)
    except ValueError as exc:
        return _refuse(str(exc))
    if args.emulate_sm_share and args.partition_backend not in ("auto", "cpu"):
        return _refuse(f"--emulate-sm-share needs --partition-backend cpu (it is {args.partition_backend}): "
                       "a real partition must not be slowed by a stand-in")
    if not args.max_request_body_mib > 0:
        return _refuse(f"--max-request-body-mib must be a positive number, got {args.max_request_body_mib}")
    if engine_config.model is None:       # after the flag checks: a refused command writes nothing
        from semipd.runtime.tiny_model import default_model_dir
        engine_config.model = str(default_model_dir())
        logging.getLogger("semipd").info("no --model given: serving the embedded tiny random model at %s",
                                         engine_config.model)
    server_config = ServerConfig(host=args.host, port=args.port, admin_token=_admin_token(args.admin_token_file),
                                 admin_token_file=args.admin_token_file,
                                 graceful_timeout=args.graceful_timeout, log_level=args.log_level,
                                 tool_call_parser=args.tool_call_parser,
                                 max_request_body_bytes=int(args.max_request_body_mib * 2**20))
    from semipd.runtime.server import serve as run_server
    return run_server(engine_config, server_config)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="semipd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    sub.add_parser("tiny-model", help="write a small random model with a tokenizer and chat template (no network)",
                   add_help=False)
    sub.add_parser("operator", help="run the SemiPDService Kubernetes operator", add_help=False)
    sub.add_parser("bench", help="drive an OpenAI-compatible server with load; latency percentiles, SLO attainment, "
                                 "goodput", add_help=False)
    sub.add_parser("simulate", help="predict SLO attainment of semipd pods (or unified serving) with the real policy "
                                    "(simulated figures)", add_help=False)
    if argv and argv[0] == "bench":
        from semipd.loadgen.cli import main as bench_main
        return bench_main(argv[1:])
    if argv and argv[0] == "simulate":
        from semipd.sim.cli import main as simulate_main
        return simulate_main(argv[1:])
    if argv and argv[0] == "tiny-model":
        from semipd.runtime.tiny_model import main as tiny_model_main
        return tiny_model_main(argv[1:])
    if argv and argv[0] == "operator":
        from semipd.operator.main import main as operator_main
        return operator_main(argv[1:])
    args = parser.parse_args(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
