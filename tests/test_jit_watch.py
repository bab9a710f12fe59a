"""engine/runtime/jit_watch.py against Triton's own hook contract (the GPU test in test_gpu.py runs a real
workload and asserts no late compile)."""
import pytest

from engine.runtime.jit_watch import LateCompiles

knobs = pytest.importorskip("triton").knobs


def test_late_compiles_counts_through_tritons_hooks(capsys):
    rt = knobs.runtime
    saved = rt.jit_cache_hook, rt.jit_post_compile_hook
    try:
        w = LateCompiles(rank=1)
        assert w.stats() == {"late_compiles": 0, "late_compile_s": 0.0, "late_kernels": []}
        assert w.install() and w.active
        fn = type("Info", (), {"name": "_some_kernel"})()
        kw = dict(key=("sig", 16), repr="_some_kernel[num_warps=4](x: *fp32)", fn=fn, compile={},
                  is_manual_warmup=False, already_compiled=False)
        assert not rt.jit_cache_hook(**kw)  # a truthy answer would make Triton skip the compile
        rt.jit_post_compile_hook(**kw)
        rt.jit_cache_hook(**{**kw, "key": ("other", 1)})
        rt.jit_post_compile_hook(**{**kw, "key": ("other", 1)})
        s = w.stats()
        assert s["late_compiles"] == 2 and s["late_compile_s"] >= 0
        assert [n.split(" ")[0] for n in s["late_kernels"]] == ["_some_kernel", "_some_kernel"]
        assert "stage 1: Triton compiled _some_kernel[num_warps=4]" in capsys.readouterr().err
    finally:
        rt.jit_cache_hook, rt.jit_post_compile_hook = saved
