"""bench/bench_decode_ablate.py refuses bad A/B arguments with one `error:` line before touching a
GPU: an unknown Backend field, a non-integer value, fewer than one round."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_decode_ablate.py"


@pytest.mark.parametrize("args,says", [
    (["--ab", "nope=1"], "--ab 'nope=1': expected FIELD=INT"),
    (["--ab", "moe_rows_max_pairs=lots"], "--ab 'moe_rows_max_pairs=lots': expected FIELD=INT"),
    (["--ab", "moe_rows_max_pairs"], "expected FIELD=INT"),
    (["--rounds", "0"], "--rounds must be at least 1, got 0"),
    (["--rounds", "-3"], "--rounds must be at least 1, got -3"),
])
def test_bad_ab_arguments_are_refused_with_one_error_line(args, says):
    r = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("bench_decode_ablate.py: error:") and says in last, r.stderr
