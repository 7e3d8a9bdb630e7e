"""The exactness tests of the bounds, the decoder and the cache, rerun with each network option on.

An option that changes what a network call computes (a readout term, a second pass) must keep
every exactness statement: T2 (AR decoding is the causal loop), T4 (the AR bound is the
teacher-forced cross-entropy), cached = uncached decoding, the fused commit, and the rules of
theory §2 in the trunk. Each option's module (``test_output_prior``, ``test_self_condition``)
tests what is its own; a new option is rerun here by adding one entry to ``OPTIONS``.
"""

from __future__ import annotations

import pytest

from flowtext import schedules
from flowtext.nn.latents import bind_prior_schedule

from . import _nets, test_decoding, test_nn, test_objectives
from .test_output_prior import prior_net
from .test_self_condition import sc_net

OPTIONS = {"output_prior": prior_net, "self_condition": sc_net}
"""Each option's factory ``(seed, **config overrides) -> perturbed tiny float64 network``."""


@pytest.fixture(params=sorted(OPTIONS))
def option(request):
    return request.param


@pytest.fixture
def decoding_net(option, monkeypatch):
    net = OPTIONS[option](0, **test_decoding.TINY)
    monkeypatch.setattr(test_decoding, "NET", net)
    return net


def test_t4(option, monkeypatch):
    def tiny_net(seed, vocab=11, max_len=16):
        return OPTIONS[option](seed, scale=0.05, vocab_size=vocab, max_len=max_len)

    monkeypatch.setattr(test_objectives, "tiny_net", tiny_net)
    test_objectives.test_t4_elbo_under_autoregressive_is_teacher_forced_ce()
    test_objectives.test_t4_fails_for_the_old_readout()
    for block in (2, 3):
        test_objectives.test_one_jump_block_bound_is_exact_in_both_forms(block)
    test_objectives.test_single_stream_under_ar_with_one_draw_per_step_is_exact()


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("p", [0, 3])
def test_t2(decoding_net, greedy, p):
    test_decoding.test_t2_autoregressive_equals_causal_ar_loop(greedy, p)


@pytest.mark.parametrize("name,kwargs,steps", test_decoding.STATIC_CASES)
@pytest.mark.parametrize("solver,greedy", [("euler", True), ("ancestral-mixture", False)])
def test_cached_decoding(decoding_net, name, kwargs, steps, solver, greedy):
    test_decoding.test_cached_equals_uncached(name, kwargs, steps, solver, greedy)


def test_commit_forward(decoding_net):
    test_decoding.test_commit_forward_equals_commit_then_forward()
    test_decoding.test_without_commit_forward_the_decoder_reads_the_same_next_token_logits(
        "block", {"size": 4}, 8
    )


def test_visibility_and_cache_exactness(option, monkeypatch):
    """The output of a token depends only on what it sees (theory §2), option on."""
    model = test_nn.make_model(**{option: True})
    bind_prior_schedule(model, schedules.get("cosine"))
    monkeypatch.setattr(test_nn, "MODEL", model)
    test_nn.test_cache_is_exact()
    test_nn.test_cache_padding_entries_are_invisible()
    test_nn.test_committed_outputs_ignore_live_and_noise_tokens()
    test_nn.test_noise_tokens_input_is_not_read()
    test_nn.test_two_stream_equals_sequential_blocks()


def test_null_logits(option, monkeypatch):
    """The lean null query computes forward's logits and gradients, option on."""

    def perturbed_net(seed=0, output_prior=False, **overrides):  # the option sets its own
        return OPTIONS[option](seed, **overrides)

    monkeypatch.setattr(_nets, "perturbed_net", perturbed_net)
    test_nn.test_null_logits_equal_the_lone_null_token_forward(False)
