"""engine.server.reasoning: Qwen3's <think> split whole and streamed (every split point reassembles)."""
import pytest

from engine.server.reasoning import ReasoningStreamParser, split_reasoning

CASES = {  # text -> (reasoning, content) with thinking on
    "model_opens_think": ("<think>\nLet me see.\n</think>\n\nHello!", ("\nLet me see.\n", "\n\nHello!")),
    "prompt_opened_think": ("Let me see.</think>Hi", ("Let me see.", "Hi")),
    "empty_thinking": ("<think>\n\n</think>\n\nok", ("\n\n", "\n\nok")),
    "truncated_in_thinking": ("<think>still going <", ("still going <", None)),
    "nothing_after": ("<think>x</think>", ("x", None)),
    "tags_in_content": ("r</think>a <think>b</think> c", ("r", "a <think>b</think> c")),
    "think_not_at_start": (" <think>x</think>y", (" <think>x", "y")),
    "partial_open_only": ("<thi", ("<thi", None)),
    "open_only": ("<think>", (None, None)),
    "empty": ("", (None, None)),
    "unicode": ("<think>日本</think>語", ("日本", "語")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_split_whole(name):
    text, want = CASES[name]
    assert split_reasoning(text) == want
    assert split_reasoning(text, thinking=False) == (None, text or None)


def run(text: str, cuts: list[int], thinking: bool = True) -> tuple[str | None, str | None]:
    p = ReasoningStreamParser(thinking)
    out, prev = [], 0
    for c in cuts + [len(text)]:
        out += p.feed(text[prev:c])
        prev = c
    out += p.finish()
    assert all(len(d) == 1 and next(iter(d.values())) for d in out)  # one non-empty field per delta
    r = "".join(d.get("reasoning_content", "") for d in out)
    c = "".join(d.get("content", "") for d in out)
    return r or None, c or None


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("thinking", [True, False])
def test_stream_at_every_split_point_equals_whole(name, thinking):
    text = CASES[name][0]
    want = split_reasoning(text, thinking)
    for cut in range(len(text) + 1):
        assert run(text, [cut], thinking) == want, cut
    for a in range(len(text) + 1):
        for b in range(a, len(text) + 1):
            assert run(text, [a, b], thinking) == want, (a, b)
    assert run(text, list(range(1, len(text))), thinking) == want


def test_stream_order_and_reasoning_end():
    p = ReasoningStreamParser()
    assert p.feed("<think>") == [] and p.feed("plan</thi") == [{"reasoning_content": "plan"}]
    assert not p.reasoning_ended
    assert p.feed("nk>\n\nans") == [{"content": "\n\nans"}] and p.reasoning_ended
    assert p.feed("wer</think>") == [{"content": "wer</think>"}] and p.finish() == []
