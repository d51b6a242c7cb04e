"""Models named by a URI instead of a directory. `hf://ORG/NAME[@REVISION]` is fetched from the Hugging Face Hub
with huggingface_hub's snapshot_download (resumable, progress on stderr, so in a pod's log; HF_TOKEN and
HF_ENDPOINT honoured) into --download-dir, once: a later start with the same directory checks the files against
the Hub and fetches only what changed, or, with the Hub out of reach, serves the copy it has (huggingface_hub
falls back to it; should it raise instead, the copy is served all the same). Only what the
engine reads is fetched (configs, tokenizer, chat template, safetensors), never pickled weights. Other schemes
are refused with the sources that do work."""
import logging
from dataclasses import replace
from pathlib import Path

from semipd.runtime.config import EngineConfig
from semipd.runtime.loader import ModelLoadError

log = logging.getLogger("semipd.fetch")

MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]


def parse_hf_uri(uri: str) -> tuple[str, str | None]:
    """hf://ORG/NAME[@REVISION] -> (repo id, revision or None); ModelLoadError for anything else."""
    scheme, _, rest = uri.partition("://")
    if scheme != "hf":
        raise ModelLoadError(f"--model {uri}: {scheme}:// models are not fetched; use hf://ORG/NAME, a local "
                             f"directory, or (in Kubernetes) a PVC or a model baked into the image")
    repo, _, revision = rest.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ModelLoadError(f"--model {uri}: expected hf://ORG/NAME or hf://ORG/NAME@REVISION")
    return repo, revision or None


def resolve_model(config: EngineConfig) -> EngineConfig:
    """The config with a URI model replaced by the local directory it was fetched into (named as the repo)."""
    if config.model is None or "://" not in config.model:
        return config
    repo, revision = parse_hf_uri(config.model)
    target = Path(config.download_dir) / repo.replace("/", "--")
    log.info("fetching %s%s from the Hugging Face Hub into %s", repo, f"@{revision}" if revision else "", target)
    from huggingface_hub import snapshot_download
    try:
        path = Path(snapshot_download(repo, revision=revision, local_dir=target, allow_patterns=MODEL_FILES))
    except Exception as e:       # no network, no such repo, no access: one line, or the copy fetched before
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if (target / "config.json").exists():
            log.warning("cannot reach the Hub (%s); serving the copy of %s fetched before, at %s", reason, repo,
                        target)
            path = target
        else:
            raise ModelLoadError(f"--model {config.model}: cannot fetch it from the Hugging Face Hub: {reason}") \
                from None
    log.info("fetched %s into %s", repo, path)
    return replace(config, model=str(path), served_model_name=config.served_model_name or repo)
