"""engine/request_checks.py: prompt ids checked without a Python test per id, deciding as the
per-id test does."""
import enum
import random

import numpy as np
import pytest

from engine.request_checks import encode_prompt, valid_ids


class Tok(enum.IntEnum):
    A = 3


def per_id(ids, V) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in ids)


def test_valid_ids_decides_as_the_per_id_test():
    rng = random.Random(0)
    V = 512
    odd = [-1, V, V - 1, 0, True, False, 1.0, 3.5, "7", None, np.int64(5), Tok.A, 1 << 70, -(1 << 70)]
    cases = [[], [0], [V - 1], [V], [-1], [True], [Tok.A, 4], list(range(V)), [0] * 5000 + [V]]
    for _ in range(300):
        ids = [rng.randrange(V) for _ in range(rng.randrange(1, 50))]
        if rng.random() < 0.7:
            ids[rng.randrange(len(ids))] = rng.choice(odd)
        cases.append(ids)
    for ids in cases:
        assert valid_ids(ids, V) == per_id(ids, V), ids
        if per_id(ids, V) and ids:
            assert encode_prompt(ids, None, V) == ids
        else:
            with pytest.raises(ValueError, match="empty prompt" if not ids else r"integers in \[0, 512\)"):
                encode_prompt(ids, None, V)
