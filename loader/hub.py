"""Model ids that are not folders come from the Hugging Face hub: the small files first (config,
index, tokenizer), then each rank fetches only the shards its stage needs. Honours HF_HUB_OFFLINE
and the local cache through huggingface_hub itself."""
from __future__ import annotations

from pathlib import Path

from model.config import ModelConfig

from .checkpoint import INDEX_NAME, SINGLE_NAME, CheckpointError, CheckpointIndex
from .partition import StageSpec

SMALL_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def is_hub_id(name: str) -> bool:
    return not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/"))


def _download(repo_id: str, filename: str, revision: str | None, required: bool) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: must come first
        if required:
            raise CheckpointError(f"hub model {repo_id}: {filename} is not in the local cache and the hub "
                                  f"cannot be reached (HF_HUB_OFFLINE or no network): {e}") from None
        return None
    except EntryNotFoundError:
        if required:
            raise CheckpointError(f"hub model {repo_id}: file {filename} not found in the repository") from None
        return None
    except RepositoryNotFoundError:
        raise CheckpointError(f"hub model {repo_id}: repository not found (or private)") from None


def fetch_metadata(repo_id: str, revision: str | None = None) -> Path:
    """Download config.json, the index (or learn there is a single model.safetensors) and the
    tokenizer files; returns the local snapshot folder."""
    folder = _download(repo_id, "config.json", revision, required=True).parent
    if _download(repo_id, INDEX_NAME, revision, required=False) is None:
        _download(repo_id, SINGLE_NAME, revision, required=True)
    for name in SMALL_FILES:
        _download(repo_id, name, revision, required=False)
    return folder


def fetch_stage_shards(repo_id: str, folder: Path, cfg: ModelConfig, spec: StageSpec,
                       revision: str | None = None) -> list[Path]:
    """Download only the shards that hold this stage's tensors."""
    from .load import stage_placements
    index = CheckpointIndex(folder)
    names = [n for n, _ in stage_placements(index, cfg, spec, check_shapes=False)]
    files = index.files_for(names)
    for f in files:
        _download(repo_id, f.name, revision, required=True)
    return files
