"""SamplingParams: defaults, normalisation, and validation errors that name the parameter."""

from __future__ import annotations

import dataclasses
import math

import pytest

from aotlm.errors import AotlmError, RequestError
from aotlm.runtime.generation.sampling_params import SamplingParams


def test_defaults_are_valid_and_frozen():
    params = SamplingParams().validate()
    assert params.temperature == 1.0 and params.top_k == 0 and params.max_tokens == 16
    assert params.stop == () and params.stop_token_ids == () and params.n == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.5  # type: ignore[misc]


def test_stop_is_normalised_to_a_tuple():
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]
    assert SamplingParams(stop=None).stop == ()  # type: ignore[arg-type]
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)  # type: ignore[arg-type]
    hash(SamplingParams(stop=["a"]))  # type: ignore[arg-type]


def test_greedy_and_top_k_off():
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy
    assert SamplingParams(top_k=-1).validate().effective_top_k == 0
    assert SamplingParams(top_k=0).effective_top_k == 0
    assert SamplingParams(top_k=40).effective_top_k == 40
    # found by the API fuzzer: a top_k past int32 crashed the packing of the sampler's inputs
    assert SamplingParams(top_k=82518851406576).validate().effective_top_k == 2**31 - 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"temperature": 100},
        {"top_p": 1e-6},
        {"top_k": 1},
        {"min_p": 1.0},
        {"presence_penalty": -2.0},
        {"frequency_penalty": 2},
        {"repetition_penalty": 1e-3},
        {"max_tokens": 1},
        {"n": 16},
        {"logprobs": 0},
        {"logprobs": 20},
        {"seed": -5},
        {"seed": 2**70},
        {"stop": ("###",), "stop_token_ids": (0, 7)},
        {"ignore_eos": True},
    ],
)
def test_edges_of_the_ranges_are_valid(kwargs):
    SamplingParams(**kwargs).validate()


@pytest.mark.parametrize(
    ("kwargs", "name", "allowed"),
    [
        ({"temperature": -0.1}, "temperature", "[0, 100]"),
        ({"temperature": 100.5}, "temperature", "[0, 100]"),
        ({"temperature": math.nan}, "temperature", "[0, 100]"),
        ({"temperature": "hot"}, "temperature", "[0, 100]"),
        ({"top_p": 0.0}, "top_p", "(0, 1]"),
        ({"top_p": 1.01}, "top_p", "(0, 1]"),
        ({"top_k": -2}, "top_k", ">= 0"),
        ({"top_k": 2.5}, "top_k", ">= 0"),
        ({"min_p": -0.1}, "min_p", "[0, 1]"),
        ({"min_p": 1.5}, "min_p", "[0, 1]"),
        ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
        ({"frequency_penalty": -3}, "frequency_penalty", "[-2, 2]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "(0, inf)"),
        ({"repetition_penalty": math.inf}, "repetition_penalty", "(0, inf)"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"max_tokens": True}, "max_tokens", ">= 1"),
        ({"n": 0}, "n", "1..16"),
        ({"n": 17}, "n", "1..16"),
        ({"logprobs": -1}, "logprobs", "0..20"),
        ({"logprobs": 21}, "logprobs", "0..20"),
        ({"seed": 1.5}, "seed", "integer"),
        ({"stop": ("ok", "")}, "stop", "non-empty"),
        ({"stop_token_ids": (5, -1)}, "stop_token_ids", ">= 0"),
        ({"ignore_eos": 1}, "ignore_eos", "boolean"),
    ],
)
def test_invalid_values_name_the_parameter_and_range(kwargs, name, allowed):
    with pytest.raises(RequestError) as info:
        SamplingParams(**kwargs).validate()
    message = str(info.value)
    assert message.startswith(f"{name} must")
    assert allowed in message
    assert isinstance(info.value, AotlmError)


def test_non_list_stop_is_a_request_error():
    with pytest.raises(RequestError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=5)  # type: ignore[arg-type]
