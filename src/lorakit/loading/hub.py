"""Where a model lives: a local directory, or a Hugging Face model ID (`org/name[@revision]`) resolved through
the local Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`), downloaded only when the network allows.

    resolve_model("runs/my-model")          -> Path("runs/my-model")
    resolve_model("meta-llama/Llama-3.2-1B@main")  -> <cache>/models--meta-llama--Llama-3.2-1B/snapshots/<sha>

The environment is read at call time (a test or a user may set `HF_HUB_CACHE` / `HF_HUB_OFFLINE` after
import); nothing process-wide is changed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelDirError

# what a model ID looks like: `name` or `org/name`, optional `@revision` (branch, tag or commit)
_MODEL_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<rev>[\w./-]+))?")
# files a model needs: weights (safetensors only: no pickles are fetched), config, tokenizer, chat template
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ModelId:
    """A Hugging Face model ID with an optional revision."""

    repo_id: str  # "org/name"
    revision: str | None = None  # branch, tag or commit; None: "main"

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_model_id(text: str) -> ModelId | None:
    """`org/name[@revision]` as a ModelId; None for anything that cannot be a model ID (a path such as
    `./model`, `/abs/dir`, `~/m`, `a/b/c`)."""
    match = _MODEL_ID.fullmatch(text)
    if match is None or text.startswith((".", "~")):
        return None
    return ModelId(match.group("repo"), match.group("rev"))


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    """Whether downloads are off (`HF_HUB_OFFLINE` or transformers' `TRANSFORMERS_OFFLINE`)."""
    return any(os.environ.get(name, "").lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model(name_or_path: str | Path) -> Path:
    """The local directory of a model: `name_or_path` itself when it is a directory, else the snapshot of the
    model ID in the Hugging Face cache, downloaded first when it is not there and the network allows.

    Raises:
        ModelDirError: a path that does not exist and is not a model ID; an ID that is not in the cache while
            offline (`HF_HUB_OFFLINE=1`) or whose download fails; the message names the ID and the cache searched.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelDirError(f"model {name_or_path}: {path} is a file, not a model directory")
        return path
    model_id = parse_model_id(str(name_or_path))
    if model_id is None:
        raise ModelDirError(f"model directory {name_or_path} does not exist (and it is not a Hugging Face model ID "
                            f"such as org/name or org/name@revision)")
    cache = hub_cache_dir()
    found = _from_cache(model_id, cache)
    if found is not None:
        return found
    not_here = (f"no local directory {name_or_path!r}, and the Hugging Face model {model_id} "
                f"(revision {model_id.revision or 'main'}) is not in the cache {cache}")
    if hub_offline():
        raise ModelDirError(f"{not_here}; downloads are off (HF_HUB_OFFLINE); download it on a machine with "
                            f"network access into that cache, or pass a local directory")
    return _download(model_id, cache, not_here)


def _from_cache(model_id: ModelId, cache: Path) -> Path | None:
    """The cached snapshot of `model_id` (with a config.json), or None."""
    from huggingface_hub import snapshot_download

    try:
        found = Path(snapshot_download(model_id.repo_id, revision=model_id.revision, cache_dir=cache,
                                       local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss (no entry, no ref, a bad ID) means "not in the cache"
        return None
    return found if (found / "config.json").is_file() else None


def _download(model_id: ModelId, cache: Path, not_here: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        found = snapshot_download(model_id.repo_id, revision=model_id.revision, cache_dir=cache,
                                  allow_patterns=DOWNLOAD_PATTERNS, endpoint=os.environ.get("HF_ENDPOINT") or None)
    except Exception as err:  # noqa: BLE001 - network, auth, missing repo: one clear line
        reason = " ".join(str(err).split())[:300]
        raise ModelDirError(f"{not_here}, and downloading it failed ({type(err).__name__}: {reason}); check the "
                            f"ID, the network and HF_TOKEN, or set HF_HUB_OFFLINE=1 and use a local directory") from err
    directory = Path(found)
    if not (directory / "config.json").is_file():
        raise ModelDirError(f"Hugging Face model {model_id}: the download at {directory} has no config.json")
    return directory
