"""Failure and multi-process behaviour on CPU: a stage dying mid-generate, a stage failing to load,
Ctrl-C in the CLI, and two torchrun "hosts" on 127.0.0.1."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import LLM, EngineClosed, SamplingParams, StageDied
from loader.presets import preset_config
from loader.writer import write_checkpoint

pytestmark = pytest.mark.slow
LONG = SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_checkpoint(d, preset_config("tiny"), seed=5, shard_bytes=200_000)
    return d


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _listening(pids: list[int]) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the TCP sockets these processes listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # state 0A: LISTEN
                out.append(f[1])
    return out


def test_local_stages_listen_on_loopback_only(tiny):
    """The rendezvous (a TCPStore binds every interface) and gloo's sockets: nothing is reachable
    from another host when every stage runs here."""
    with LLM(str(tiny), stages=2, verbose=False) as llm:
        addrs = _listening([p.pid for p in llm.client.procs])
        assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0))[0].token_ids
    loopback = ("0100007F:", "00000000000000000000000001000000:", "0000000000000000FFFF00000100007F:")
    assert addrs and all(a.startswith(loopback) for a in addrs), addrs


@pytest.mark.parametrize("victim", [1, 0])
def test_dead_stage_ends_generate_within_30s(tiny, victim):
    llm = LLM(str(tiny), stages=2, verbose=False)
    pids = [p.pid for p in llm.client.procs]
    stream = llm.stream([[5, 6, 7]], LONG)
    for _ in range(3):
        next(stream)
    t0 = time.monotonic()
    os.kill(pids[victim], signal.SIGKILL)
    with pytest.raises(StageDied, match=f"stage {victim}"):
        for _ in stream:
            pass
    assert time.monotonic() - t0 < 30
    t1 = time.monotonic()
    with pytest.raises(StageDied, match=f"stage {victim}"):  # and every later call, at once
        llm.stats()
    with pytest.raises(StageDied):
        llm.generate([[5, 6]], LONG)
    assert time.monotonic() - t1 < 1
    assert isinstance(llm.dead_error, StageDied) and not llm.is_closed
    llm.close()
    assert llm.is_closed and isinstance(llm.dead_error, StageDied)
    time.sleep(0.5)
    assert not any(_alive(p) for p in pids), "a stage process outlived the failure"


@pytest.mark.parametrize("bad_rank", [1, 0])
def test_stage_load_error_names_the_file_and_ends_every_stage(tiny, tmp_path, bad_rank):
    """A truncated shard: StageDied names the stage and the file, carries the stage's traceback,
    and no stage outlives it (the healthy stage is waiting for its peer in a collective)."""
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    shards = sorted(bad.glob("model-*.safetensors"))
    victim = shards[-1] if bad_rank == 1 else shards[0]  # the last shard holds the last stage's tensors
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = set(_children(os.getpid()))
    with pytest.raises(StageDied) as e:
        LLM(str(bad), stages=2, verbose=False)
    first = str(e.value).splitlines()[0]
    assert f"stage {bad_rank} failed" in first and victim.name in first and "truncated" in first, first
    assert "Traceback (most recent call last)" in str(e.value) and "load.py" in str(e.value)
    assert not [p for p in set(_children(os.getpid())) - before if _alive(p)], "a stage outlived the failure"


def test_dropped_llm_ends_its_stages_and_its_streams(tiny):
    """The engine client holds its LLM only weakly (router callbacks, stream aborts): an LLM dropped
    without close() is collected, which ends its stages; a stream that outlives it ends with
    EngineClosed after the tokens it already had."""
    llm = LLM(str(tiny), stages=2, verbose=False)
    pids = [p.pid for p in llm.client.procs]
    stream = llm.submit([5, 6, 7], LONG)
    first = next(stream)
    del llm
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
    with pytest.raises(EngineClosed):
        for ev in stream:
            assert ev.finish_reason is None
    assert first.finish_reason is None and stream.finished


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # the process ended between the listing and the read
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_ctrl_c_in_cli_ends_every_stage(tiny):
    cmd = [sys.executable, "-m", "engine", "generate", "--model", str(tiny), "--stages", "2",
           "--prompt-ids", "5,6,7", "--max-tokens", "4000", "--ignore-eos", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.read(20)  # tokens are streaming: the stages are up
    kids = _children(proc.pid)
    stage_pids = [k for k in kids if "engine.runtime.worker" in Path(f"/proc/{k}/cmdline").read_text()]
    assert len(stage_pids) == 2
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    err = proc.stderr.read().strip().splitlines()
    assert err == ["error: interrupted"], err
    time.sleep(0.5)
    assert not any(_alive(p) for p in stage_pids)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_hosts_match_spawned_engine(tiny):
    port = _port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    args = ["-m", "engine", "generate", "--model", str(tiny), "--prompt-ids", "5,6,7,8", "--max-tokens", "6",
            "--ignore-eos", "--quiet"]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *common, "--node-rank", str(r), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    with LLM(str(tiny), stages=2, verbose=False) as llm:
        want = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].text
    assert outs[0][0].rstrip("\n") == want
    assert "new tokens: 6" in outs[0][1]


@pytest.mark.parametrize("delay", [0.3, 1.5])
def test_ctrl_c_while_starting_prints_one_line(tiny, delay):
    cmd = [sys.executable, "-m", "engine", "generate", "--model", str(tiny), "--stages", "2",
           "--prompt-ids", "5,6,7", "--max-tokens", "4000", "--ignore-eos", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    kids = _children(proc.pid)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert err.strip().splitlines() == ["error: interrupted"], err
    time.sleep(0.5)
    assert not any(_alive(p) for p in kids + _children(proc.pid))


@pytest.mark.parametrize("client", ["half-imported", "kill fails"])
def test_ctrl_c_handler_with_a_half_imported_client(client, monkeypatch, capsys):
    """Ctrl-C that lands inside `import engine.client` (seen on a loaded 2-core machine at 1.5 s):
    the module is in sys.modules without kill_workers yet; and a kill_workers that raises. Either
    way the handler prints the one line and exits 130, with no traceback."""
    import types

    from engine import __main__ as cli

    mod = types.ModuleType("engine.client")
    if client == "kill fails":
        def kill_workers():
            raise OSError("no such process")
        mod.kill_workers = kill_workers
    monkeypatch.setitem(sys.modules, "engine.client", mod)

    def exit_(code):
        raise SystemExit(code)
    monkeypatch.setattr(cli.os, "_exit", exit_)
    with pytest.raises(SystemExit) as e:
        cli._interrupted(signal.SIGINT, None)
    assert e.value.code == 130
    assert capsys.readouterr().err.splitlines() == ["error: interrupted"]


def test_relative_model_path_and_dict_params(tiny, monkeypatch):
    """The stages run in another working directory: a relative path is resolved before they start."""
    monkeypatch.chdir(tiny.parent)
    with LLM(tiny.name, stages=2, verbose=False) as llm:
        assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0))[0].token_ids) == 3
        with pytest.raises(TypeError, match="params must be SamplingParams"):  # as vLLM: no dict
            llm.generate("Hello", {"max_tokens": 3})


def test_kv_cache_gib_too_small_refused_before_any_stage_starts(tiny):
    before = set(_children(os.getpid()))
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="kv_cache_gib=1e-05 holds no KV block"):
        LLM(str(tiny), stages=2, verbose=False, kv_cache_gib=0.00001)
    assert time.monotonic() - t0 < 5 and set(_children(os.getpid())) == before


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_cli_bad_shard_is_one_error_line(tiny, tmp_path, damage):
    """Relative --model, a truncated or missing shard: stderr is the one `error:` line (the stage's
    traceback goes to the file it names), whatever the stages printed while loading."""
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    victim = sorted(bad.glob("model-*.safetensors"))[-1]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:1000])
    else:
        victim.unlink()
    r = subprocess.run([sys.executable, "-m", "engine", "generate", "--model", "bad", "--prompt", "hi", "--stages", "2",
                        "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent),
                                                                        os.environ.get("PYTHONPATH", "")])))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: stage"), r.stderr
    assert victim.name in lines[0]
    details = Path(lines[0].rsplit("(details: ", 1)[1].rstrip(")"))
    assert "Traceback (most recent call last)" in details.read_text()
    details.unlink()
