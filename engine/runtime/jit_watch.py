"""Triton kernels a stage compiles after its start-up warm-up. Each is a request paying JIT (the
warm-up in model/warmup.py and StageWorker.warm_sampler is meant to leave none): counted with its
compile time in stats() as `late_compiles` / `late_compile_s`, named in `late_kernels`, and logged
once each to stderr."""
from __future__ import annotations

import sys
import time

MAX_NAMES = 32  # kernel variants named in stats(); the count goes on past it


class LateCompiles:
    def __init__(self, rank: int):
        self.rank = rank
        self.count, self.seconds = 0, 0.0
        self.names: list[str] = []
        self._started: dict = {}
        self.active = False

    def install(self) -> bool:
        """Watch from now on (False where this Triton has no compile hooks: nothing is counted)."""
        try:
            from triton import knobs
        except ImportError:
            return False
        rt = getattr(knobs, "runtime", None)
        if rt is None or not hasattr(rt, "jit_post_compile_hook") or not hasattr(rt, "jit_cache_hook"):
            return False
        rt.jit_cache_hook, rt.jit_post_compile_hook = self._before, self._after
        self.active = True
        return True

    def _before(self, **kw) -> None:  # must return a falsy value: a truthy one skips the compile
        self._started[str(kw.get("key"))] = time.perf_counter()
        return None

    def _after(self, **kw) -> None:
        t0 = self._started.pop(str(kw.get("key")), None)
        secs = time.perf_counter() - t0 if t0 is not None else 0.0
        fn = kw.get("fn")
        name = getattr(fn, "name", None) or str(kw.get("repr", "?"))
        self.count += 1
        self.seconds += secs
        if len(self.names) < MAX_NAMES:
            self.names.append(f"{name} ({secs:.2f} s)")
        print(f"[moepipe] stage {self.rank}: Triton compiled {kw.get('repr', name)} after start-up "
              f"({secs:.2f} s inside a request)", file=sys.stderr, flush=True)
        return None

    def stats(self) -> dict:
        return {"late_compiles": self.count, "late_compile_s": self.seconds, "late_kernels": list(self.names)}
