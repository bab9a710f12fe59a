"""Hub model ids: the small files first, then only the shards a stage needs; missing and uncached
files fail naming the file. huggingface_hub.hf_hub_download is faked (no network) for the unit
tests; the end-to-end test runs the real one, offline, against a hand-built HF cache."""
from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

from loader.model_files import load_tokenizer, resolve_model, stop_token_ids
from loader.checkpoint import INDEX_NAME, SINGLE_NAME, CheckpointError, CheckpointIndex
from loader.hub import fetch_metadata, fetch_stage_shards, is_hub_id
from loader.load import load_stage, stage_placements
from loader.partition import partition
from loader.presets import preset_config
from loader.writer import write_checkpoint
from model.config import ConfigError, ModelConfig

REPO = "org/tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHARD_BYTES = 300_000  # about one decoder layer per shard: the two stages of a 2-way split differ
METADATA = ["config.json", INDEX_NAME, "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"]


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("remote")
    write_checkpoint(d, preset_config("tiny"), seed=21, shard_bytes=SHARD_BYTES)
    return d


@pytest.fixture(scope="module")
def remote_single(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("remote_single")
    write_checkpoint(d, preset_config("tiny"), seed=21, single_file=True)
    return d


class FakeHub:
    """hf_hub_download stand-in: copies from a local 'remote' folder into a snapshot folder."""

    def __init__(self, remote: Path, cache: Path):
        self.remote, self.snapshot = remote, cache / f"models--org--tiny/snapshots/{COMMIT}"
        self.requests: list[str] = []
        self.revisions: list = []
        self.missing: set[str] = set()  # raise EntryNotFoundError (absent upstream)
        self.uncached: set[str] = set()  # raise LocalEntryNotFoundError (offline, not cached)
        self.no_repo = False

    def __call__(self, repo_id: str, filename: str, *, revision: str | None = None, **kw) -> str:
        assert repo_id == REPO and not kw
        self.requests.append(filename)
        self.revisions.append(revision)
        if self.no_repo:
            import httpx2
            req = httpx2.Request("GET", f"https://huggingface.co/{repo_id}/resolve/main/{filename}")
            raise RepositoryNotFoundError("404 repository not found", response=httpx2.Response(404, request=req))
        if filename in self.uncached:
            raise LocalEntryNotFoundError(
                "Cannot find the requested files in the disk cache and outgoing traffic has been disabled. "
                "To enable hf.co look-ups and downloads online, set 'local_files_only' to False.")
        src = self.remote / filename
        if filename in self.missing or not src.exists():
            raise EntryNotFoundError(f"404 Client Error: Entry Not Found for url: .../{repo_id}/{filename}")
        self.snapshot.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, self.snapshot / filename)
        return str(self.snapshot / filename)

    @property
    def shards(self) -> list[str]:
        return [f for f in self.requests if f.endswith(".safetensors")]


@pytest.fixture
def hub(remote, tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(remote, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    monkeypatch.chdir(tmp_path)  # "org/tiny" must not exist as a folder
    return fake


def stage_files(folder: Path, stages: int) -> list[set[str]]:
    index = CheckpointIndex(folder)
    cfg = ModelConfig.from_file(folder)
    return [{f.name for f in index.files_for([n for n, _ in stage_placements(index, cfg, s)])}
            for s in partition(cfg.num_hidden_layers, stages)]


# ---- ids -----------------------------------------------------------------------------------------
def test_is_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/tiny") and is_hub_id("Qwen/Qwen3-30B-A3B")
    assert not is_hub_id("tiny") and not is_hub_id("a/b/c") and not is_hub_id("/abs/path") and not is_hub_id("./x")
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert not is_hub_id("org/local")  # an existing folder wins
    folder, repo = resolve_model("org/local")
    assert folder == Path("org/local") and repo is None


def test_resolve_model_rejects_non_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no such model folder"):
        resolve_model("missing_folder")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="expected a model folder"):
        resolve_model("file.txt")


# ---- metadata and shards -------------------------------------------------------------------------
def test_resolve_model_fetches_small_files_only(hub, remote):
    folder, repo = resolve_model(REPO)
    assert repo == REPO and folder == hub.snapshot
    assert hub.requests == METADATA
    assert not hub.shards and not list(folder.glob("*.safetensors"))
    assert ModelConfig.from_file(folder).extra == ModelConfig.from_file(remote).extra
    assert load_tokenizer(folder) is not None
    assert stop_token_ids(folder) == stop_token_ids(remote)
    # a template kept only in chat_template.jinja reaches the snapshot, so LLM.chat and serve find it
    assert (folder / "chat_template.jinja").read_text() == (remote / "chat_template.jinja").read_text()


def test_revision_is_passed_through(hub):
    fetch_metadata(REPO, revision="v1.0")
    assert hub.revisions and set(hub.revisions) == {"v1.0"}
    hub.revisions.clear()
    cfg = ModelConfig.from_file(hub.snapshot)
    fetch_stage_shards(REPO, hub.snapshot, cfg, partition(cfg.num_hidden_layers, 2)[1], revision="v1.0")
    assert set(hub.revisions) == {"v1.0"}


def test_stage_downloads_only_its_shards(hub, remote):
    all_shards = {f.name for f in remote.glob("*.safetensors")}
    first, last = stage_files(remote, 2)
    assert first != all_shards and last != all_shards and first != last, "pick SHARD_BYTES so stages differ"

    folder, _ = resolve_model(REPO)
    cfg = ModelConfig.from_file(folder)
    s0, s1 = partition(cfg.num_hidden_layers, 2)
    hub.requests.clear()
    files = fetch_stage_shards(REPO, folder, cfg, s0)
    assert set(hub.requests) == first and len(hub.requests) == len(first)
    assert {f.name for f in files} == first and all(f.parent == folder for f in files)
    assert {f.name for f in folder.glob("*.safetensors")} == first
    # the stage loads from the partial snapshot, with the same values as from the full folder
    a = dict(load_stage(folder, cfg, s0, "cpu", torch.float32).named_parameters())
    b = dict(load_stage(remote, cfg, s0, "cpu", torch.float32).named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the other stage still needs its own shards
    with pytest.raises(CheckpointError, match="missing"):
        load_stage(folder, cfg, s1, "cpu", torch.float32)
    hub.requests.clear()
    fetch_stage_shards(REPO, folder, cfg, s1)
    assert set(hub.requests) == last
    load_stage(folder, cfg, s1, "cpu", torch.float32)


def test_single_file_repo(remote_single, tmp_path, monkeypatch):
    fake = FakeHub(remote_single, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    monkeypatch.chdir(tmp_path)
    folder, _ = resolve_model(REPO)
    assert fake.requests[:3] == ["config.json", INDEX_NAME, SINGLE_NAME]
    cfg = ModelConfig.from_file(folder)
    fake.requests.clear()
    files = fetch_stage_shards(REPO, folder, cfg, partition(cfg.num_hidden_layers, 2)[1])
    assert [f.name for f in files] == [SINGLE_NAME] and fake.requests == [SINGLE_NAME]


# ---- errors --------------------------------------------------------------------------------------
def test_optional_files_missing_upstream(hub):
    hub.missing = {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"}
    folder, _ = resolve_model(REPO)
    assert hub.requests == METADATA  # asked for, absent, tolerated
    assert load_tokenizer(folder) is None
    assert stop_token_ids(folder) == (2,)  # from config.json


@pytest.mark.parametrize("name", ["config.json", SINGLE_NAME])
def test_required_file_missing_upstream(hub, name):
    hub.missing = {name, INDEX_NAME}  # without the index, model.safetensors is required
    with pytest.raises(CheckpointError, match="not found in the repository") as e:
        resolve_model(REPO)
    assert name in str(e.value) and REPO in str(e.value)


def test_shard_missing_upstream(hub, remote):
    folder, _ = resolve_model(REPO)
    cfg = ModelConfig.from_file(folder)
    s0 = partition(cfg.num_hidden_layers, 2)[0]
    gone = sorted(stage_files(remote, 2)[0])[-1]
    hub.missing = {gone}
    with pytest.raises(CheckpointError, match="not found in the repository") as e:
        fetch_stage_shards(REPO, folder, cfg, s0)
    assert gone in str(e.value)


def test_offline_uncached_files(hub, remote):
    hub.uncached = {"tokenizer.json"}  # optional: tolerated offline
    folder, _ = resolve_model(REPO)
    assert not (folder / "tokenizer.json").exists()
    cfg = ModelConfig.from_file(folder)
    shard = sorted(stage_files(remote, 2)[1])[0]
    hub.uncached = {shard}
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE") as e:
        fetch_stage_shards(REPO, folder, cfg, partition(cfg.num_hidden_layers, 2)[1])
    assert shard in str(e.value) and "local cache" in str(e.value)
    hub.uncached = {"config.json"}
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE") as e:
        resolve_model(REPO)
    assert "config.json" in str(e.value)


def test_repository_not_found(hub):
    hub.no_repo = True
    with pytest.raises(CheckpointError, match="repository not found") as e:
        resolve_model(REPO)
    assert REPO in str(e.value)


# ---- the real hf_hub_download against a local HF cache --------------------------------------------
def make_hf_cache(cache: Path, src: Path, skip: set[str] = frozenset()) -> Path:
    """models--org--tiny/{refs/main, snapshots/<commit>/...}: what huggingface_hub resolves offline."""
    repo = cache / "models--org--tiny"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


def use_cache(monkeypatch, cache: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # for spawned stage processes
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)


def test_real_offline_cache_resolves_and_reports_uncached_shard(remote, tmp_path, monkeypatch):
    gone = sorted(stage_files(remote, 2)[1])[-1]
    snap = make_hf_cache(tmp_path / "hf", remote, skip={gone, "tokenizer.json"})
    use_cache(monkeypatch, tmp_path / "hf", tmp_path)
    folder, repo = resolve_model(REPO)
    assert folder.resolve() == snap.resolve() and repo == REPO
    cfg = ModelConfig.from_file(folder)
    s0, s1 = partition(cfg.num_hidden_layers, 2)
    fetch_stage_shards(REPO, folder, cfg, s0)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE") as e:
        fetch_stage_shards(REPO, folder, cfg, s1)
    assert gone in str(e.value)


def test_llm_from_hub_cache_matches_local_folder(remote, tmp_path, monkeypatch):
    from engine import LLM, SamplingParams
    snap = make_hf_cache(tmp_path / "hf", remote)
    use_cache(monkeypatch, tmp_path / "hf", tmp_path)
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    prompts = [[5, 17, 300, 42], "The river ran", [9] * 20]
    with LLM(REPO, stages=2, verbose=False) as llm:
        assert Path(llm.args.model_dir).resolve() == snap.resolve()
        assert llm.args.hub_repo == REPO
        got = llm.generate(prompts, greedy)
    with LLM(str(remote), stages=1, verbose=False) as llm:
        ref = llm.generate(prompts, greedy)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert all(len(o.token_ids) == 3 for o in got)
    assert [o.text for o in got] == [o.text for o in ref]
