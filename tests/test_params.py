import pytest

from backends.base import GenerationParams, Message, ModelSpec, ParamError, Usage


def test_defaults_are_valid_and_frozen():
    p = GenerationParams()
    with pytest.raises(Exception):
        p.temperature = 1.0  # type: ignore[misc]
    assert p.replace(temperature=0.3).temperature == 0.3


@pytest.mark.parametrize(
    "change, words",
    [
        ({"temperature": -0.1}, ["temperature", "0 or more", "greedy"]),
        ({"top_p": 0}, ["top_p", "above 0"]),
        ({"top_p": 1.5}, ["top_p", "at most 1"]),
        ({"top_k": -1}, ["top_k", "0 or more"]),
        ({"max_new_tokens": 0}, ["max_new_tokens", "at least 1"]),
        ({"repetition_penalty": 0}, ["repetition_penalty", "above 0"]),
        ({"min_p": 1.0}, ["min_p"]),
        ({"seed": -5}, ["seed", "random"]),
        ({"max_new_tokens": 2.5}, ["whole number"]),
        ({"temperature": "hot"}, ["temperature", "number", "'hot'"]),
        ({"temperature": float("nan")}, ["finite"]),
        ({"do_sample": "yes"}, ["do_sample", "true or false"]),
        ({"stop": [1, 2]}, ["stop", "list of strings"]),
    ],
)
def test_bad_values_say_what_is_wrong(change, words):
    with pytest.raises(ParamError) as err:
        GenerationParams.from_dict(change)
    for word in words:
        assert word in str(err.value)


def test_unknown_keys_are_named_with_the_known_ones():
    with pytest.raises(ParamError) as err:
        GenerationParams.from_dict({"temprature": 0.5})
    assert "'temprature'" in str(err.value) and "temperature" in str(err.value)


def test_numbers_from_forms_are_normalised():
    p = GenerationParams.from_dict({"top_k": 40.0, "max_new_tokens": "64", "temperature": "0.5", "stop": "###"})
    assert p.top_k == 40 and isinstance(p.top_k, int)
    assert p.max_new_tokens == 64 and p.temperature == 0.5
    assert p.stop == ("###",)


def test_stop_words_drop_empties_and_repeats():
    assert GenerationParams(stop=["a", "", "a", "b"]).stop == ("a", "b")


def test_greedy_when_sampling_off_or_temperature_zero():
    assert GenerationParams(do_sample=False).greedy
    assert GenerationParams(temperature=0).greedy
    assert not GenerationParams(temperature=0.5).greedy


def test_max_new_tokens_beyond_context_is_refused():
    with pytest.raises(ParamError) as err:
        GenerationParams(max_new_tokens=4096).check_context(2048)
    assert "context" in str(err.value) and "2048" in str(err.value)


def test_overlay_keeps_base_values():
    base = GenerationParams(temperature=0.1, top_k=5)
    p = GenerationParams.from_dict({"top_k": 7}, base=base)
    assert (p.temperature, p.top_k) == (0.1, 7)


def test_message_roles_are_checked():
    with pytest.raises(ParamError):
        Message("robot", "hi")
    with pytest.raises(ParamError):
        Message("user", None)  # type: ignore[arg-type]


def test_model_spec_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ParamError, match="'colour'"):
        ModelSpec.from_dict({"name": "x", "backend": "llamacpp", "model": "m", "colour": "red"})
    with pytest.raises(ParamError, match="quantization"):
        ModelSpec(name="x", backend="transformers", model="m", quantization="3bit")
    with pytest.raises(ParamError, match="device"):
        ModelSpec(name="x", backend="transformers", model="m", device="tpu")
    with pytest.raises(ParamError, match="temperature"):
        ModelSpec(name="x", backend="transformers", model="m", sampling={"temperature": -1})


def test_usage_tokens_per_second_counts_decode_time_only():
    u = Usage(completion_tokens=11, ttft_s=0.5, total_s=1.5)
    assert u.tokens_per_s == pytest.approx(10.0)
    assert Usage(completion_tokens=1, ttft_s=0.1, total_s=0.1).tokens_per_s is None


def test_huge_and_exact_integers():
    assert GenerationParams(seed=2**63 - 1).seed == 2**63 - 1  # exactly, not through a float
    for field in ("seed", "max_new_tokens", "top_k", "temperature"):
        with pytest.raises(ParamError, match=field):
            GenerationParams.from_dict({field: 10**400})
