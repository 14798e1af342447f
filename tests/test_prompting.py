import pytest

from backends.base import BackendError, GenerationParams, Message, Prompt
from backends.prompting import StopMatcher, fit_context


def feed_all(matcher, pieces):
    out, stopped = "", False
    for p in pieces:
        text, stopped = matcher.feed(p)
        out += text
        if stopped:
            return out, True
    return out + matcher.flush(), False


def test_stop_word_split_across_deltas_is_caught_and_hidden():
    assert feed_all(StopMatcher(["<human>:"]), ["Hi there\n<hu", "man>: next"]) == ("Hi there\n", True)


def test_partial_match_that_does_not_complete_is_released():
    assert feed_all(StopMatcher(["###"]), ["a #", "# b"]) == ("a ## b", False)


def test_no_stop_words_passes_text_through_immediately():
    m = StopMatcher([])
    assert m.feed("abc") == ("abc", False)


def test_earliest_stop_word_wins():
    assert feed_all(StopMatcher(["B", "A"]), ["xxAyyB"]) == ("xx", True)


def render(messages):
    # one token per word
    return Prompt("", [0] * sum(len(m.content.split()) for m in messages))


def test_fit_context_drops_oldest_exchanges_but_keeps_system_and_last():
    msgs = [Message("system", "s " * 5)] + [
        Message("user" if i % 2 == 0 else "assistant", "w " * 10) for i in range(6)
    ] + [Message("user", "last question")]
    prompt, dropped = fit_context(render, msgs, GenerationParams(max_new_tokens=10), n_ctx=40)
    assert dropped == 4 and len(prompt.token_ids) <= 30


def test_fit_context_errors_when_last_message_cannot_fit():
    msgs = [Message("user", "w " * 100)]
    with pytest.raises(BackendError, match="do not fit.*context"):
        fit_context(render, msgs, GenerationParams(max_new_tokens=10), n_ctx=50)


def test_fitting_a_long_chat_renders_it_a_logarithmic_number_of_times():
    from backends.prompting import memoized

    calls = {"render": 0, "encode": 0}

    def encode(text, special):
        calls["encode"] += 1
        return [0] * len(text.split())

    encode = memoized(encode)

    def render(messages):
        calls["render"] += 1
        return Prompt("", [t for m in messages for t in encode(m.content, False)])

    msgs = [Message("user" if i % 2 == 0 else "assistant", f"message {i} " + "word " * 8) for i in range(2001)]
    prompt, dropped = fit_context(render, msgs, GenerationParams(max_new_tokens=10), n_ctx=1000)
    assert len(prompt.token_ids) <= 990 and dropped % 2 == 0 and dropped > 1800
    assert len(prompt.token_ids) + 20 > 990  # as little dropped as fits: one more exchange would not
    assert calls["render"] <= 14  # bisection: about log2(1000 exchanges) + 2, not one per exchange
    assert calls["encode"] == 2001  # each message tokenized once


def test_fitting_a_continued_reply_keeps_the_question_it_answers():
    msgs = [Message("system", "s " * 5)] + [
        Message("user" if i % 2 == 0 else "assistant", "w " * 10) for i in range(6)
    ] + [Message("user", "last question"), Message("assistant", "the reply so far")]
    prompt, dropped = fit_context(render, msgs, GenerationParams(max_new_tokens=10), n_ctx=35)
    assert dropped == 6 and len(prompt.token_ids) == 5 + 2 + 4  # system, question, the reply being continued
    with pytest.raises(BackendError, match="do not fit"):
        fit_context(render, msgs, GenerationParams(max_new_tokens=10), n_ctx=20)


def test_token_logprobs_travel_with_the_text_they_make_and_a_stop_words_are_dropped():
    """An engine's (text, n, TokenLogprob) deltas: each chunk carries the tokens behind its text
    (a held-back tail's tokens come with the text once it is let out); tokens that only made a
    stop word are not given, like its text."""
    from backends.base import Clock, GenerationParams, TokenLogprob, Usage
    from backends.prompting import chunks_from_deltas

    def lp(text):
        return TokenLogprob(text.encode(), -0.5)

    pieces = ["Hel", "lo", " EN", "D", "more"]
    deltas = iter([(p, i + 1, lp(p)) for i, p in enumerate(pieces)])
    chunks = list(chunks_from_deltas(deltas, GenerationParams(stop=("END",), max_new_tokens=10), Usage(), Clock()))
    text = "".join(c.text for c in chunks)
    tokens = [t.token.decode() for c in chunks for t in c.logprobs]
    # " EN" gave the text its space (and began the stop word): it is given; "D" only ended the stop word: it is not.
    assert text == "Hello " and tokens == ["Hel", "lo", " EN"]
    assert chunks[-1].finish_reason == "stop"
