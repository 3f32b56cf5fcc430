"""Where a model comes from: a local checkpoint folder, or a Hugging Face repo id downloaded
with huggingface_hub (only the files phi3v reads; progress bars; the offline cache respected)."""

from __future__ import annotations

import os

DEFAULT_MODEL = "microsoft/Phi-3-vision-128k-instruct"

# configs, tokenizer files and weights; never the repos' remote code (*.py) or pickles (*.bin)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]


def resolve_model(model: str, revision: str | None = None) -> str:
    """Local folder -> itself; `owner/name` -> the downloaded snapshot's folder."""
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a local checkpoint folder or a Hugging Face repo id like microsoft/Phi-3-vision-128k-instruct")
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(f"{path} is a folder but has no config.json: point --model at a Phi-3-vision checkpoint folder")
        return path
    if os.path.exists(path) or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(f"model {model!r} is neither a checkpoint folder nor a Hugging Face repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise ValueError("huggingface_hub is needed to download models: pip install huggingface_hub") from e
    try:
        return snapshot_download(repo_id=model, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except Exception as e:  # network, auth, missing repo, offline cache miss
        raise ValueError(hub_error(model, e)) from e


def hub_error(model: str, e: BaseException) -> str:
    """One line for a failed download: what happened, and the local-folder way around it."""
    local = "or pass a local checkpoint folder: --model FOLDER (Python: LLM(FOLDER))"
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    if offline or type(e).__name__ == "LocalEntryNotFoundError":
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        return (f"model {model!r} is not in the local Hugging Face cache and {why}: download it once while online, "
                f"{local}")
    detail = " ".join(str(e).split()).rstrip(".")
    if len(detail) > 160:
        detail = detail[:157] + "..."
    return (f"could not download model {model!r} from the Hugging Face Hub ({type(e).__name__}: {detail}): check the "
            f"repo id and your network, {local}")
