"""Where a model comes from: a local checkpoint folder, or a Hugging Face repo id downloaded
with huggingface_hub (only the files phi3v reads; progress bars; the offline cache respected)."""

from __future__ import annotations

import os

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
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = ("it is not in the local cache (HF_HUB_OFFLINE is set)" if offline
                else "check the repo id and your network, or download it once and pass the folder")
        raise ValueError(f"could not get model {model!r} from the Hugging Face Hub: {type(e).__name__}: {e}. {hint}") from e
