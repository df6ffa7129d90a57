"""The sampler turns crafted logits into the distributions computed by hand, in the documented order.

No model here: logits are written out (often as log-probabilities, so the expected distribution can
be read off), and every filter is checked against the probabilities it must leave, not against the
sampler's own output.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest

from edgellm.errors import EdgeLLMError, InvalidSettingError
from edgellm.generate.sampling import TOP_P_ROUNDING_SLACK, Sampler, SamplingParams

# Every filter off, temperature 1: probabilities() is a plain softmax of the (biased, penalized) logits.
PLAIN = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def plain(**overrides) -> SamplingParams:
    return SamplingParams(**{**PLAIN, **overrides})


def softmax(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def log_probs(*probs: float) -> np.ndarray:
    """Logits whose softmax is exactly `probs` (up to rounding)."""
    return np.log(np.array(probs, dtype=np.float64)).astype(np.float32)


def distribution(params: SamplingParams, logits, history=()) -> np.ndarray:
    return Sampler(params, len(logits)).probabilities(np.asarray(logits), list(history))


def kept(probs: np.ndarray) -> set[int]:
    return set(np.flatnonzero(probs).tolist())


# --- reproducibility -------------------------------------------------------------------------


def test_two_samplers_with_the_same_seed_draw_the_same_200_tokens():
    rng = np.random.default_rng(1)
    steps = [rng.normal(size=50).astype(np.float32) for _ in range(200)]
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.95, min_p=0.01, seed=1234)
    a, b = Sampler(params, 50), Sampler(params, 50)
    draws_a = [a(logits, []) for logits in steps]
    draws_b = [b(logits, []) for logits in steps]
    assert draws_a == draws_b
    assert len(set(draws_a)) > 5  # it really sampled


def test_samplers_with_different_seeds_draw_different_sequences():
    logits = np.zeros(50, dtype=np.float32)
    a, b = Sampler(plain(seed=1), 50), Sampler(plain(seed=2), 50)
    assert [a(logits, []) for _ in range(200)] != [b(logits, []) for _ in range(200)]


def test_a_sampler_without_a_seed_draws_valid_tokens_from_os_entropy():
    logits = log_probs(0.5, 0.5, 1e-30)
    sampler = Sampler(plain(min_p=0.1), 3)
    assert {sampler(logits, []) for _ in range(200)} == {0, 1}


def test_probabilities_does_not_advance_the_random_generator():
    logits = np.zeros(10, dtype=np.float32)
    a, b = Sampler(plain(seed=7), 10), Sampler(plain(seed=7), 10)
    for _ in range(5):
        a.probabilities(logits, [])
    assert [a(logits, []) for _ in range(50)] == [b(logits, []) for _ in range(50)]


# --- greedy ----------------------------------------------------------------------------------


def test_top_k_1_picks_the_same_token_as_greedy_for_random_logits():
    rng = np.random.default_rng(0)
    greedy = Sampler(SamplingParams.greedy_params(), 1000)
    top1 = Sampler(SamplingParams(temperature=1.3, top_k=1, seed=0), 1000)
    for _ in range(100):
        logits = rng.normal(scale=3.0, size=1000).astype(np.float32)
        assert top1(logits, []) == greedy(logits, []) == int(np.argmax(logits))
        np.testing.assert_array_equal(top1.probabilities(logits, []), greedy.probabilities(logits, []))


def test_temperature_0_picks_the_argmax_and_breaks_ties_toward_the_lowest_id():
    params = SamplingParams(temperature=0.0)
    assert params.greedy and not SamplingParams().greedy
    logits = np.array([1.0, 5.0, 2.0, 5.0, 5.0], dtype=np.float32)
    sampler = Sampler(params, 5)
    assert sampler(logits, []) == 1
    np.testing.assert_array_equal(sampler.probabilities(logits, []), [0, 1, 0, 0, 0])


def test_top_k_ties_at_the_kth_value_keep_the_lowest_ids_so_top_k_1_matches_greedy():
    logits = np.array([1.0, 5.0, 2.0, 5.0, 5.0], dtype=np.float32)
    assert kept(distribution(plain(top_k=1), logits)) == {1}
    np.testing.assert_allclose(distribution(plain(top_k=2), logits), [0, 0.5, 0, 0.5, 0], rtol=1e-12)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams.greedy_params(),
        SamplingParams.greedy_params(logit_bias={0: 1.0}),
        SamplingParams(temperature=1.0, seed=0),
    ],
)
@pytest.mark.parametrize("broken,word", [(math.nan, "NaN"), (math.inf, "inf")])
def test_a_nan_or_infinite_logit_is_an_error_greedy_or_not(params, broken, word):
    logits = np.array([0.5, 2.0, broken, -1.0], np.float32)
    with pytest.raises(EdgeLLMError, match=word):
        Sampler(params, 4)(logits, [])


def test_greedy_takes_the_argmax_after_bias_and_penalties():
    logits = np.array([3.0, 2.0, 1.0], dtype=np.float32)
    assert Sampler(SamplingParams.greedy_params(logit_bias={2: 2.5}), 3)(logits, []) == 2
    # 3 / 2 = 1.5 < 2: the repeated token loses to the runner-up.
    assert Sampler(SamplingParams.greedy_params(repetition_penalty=2.0), 3)(logits, [0]) == 1


# --- temperature and the filters -------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.25, 0.7, 1.0, 2.0, 10.0])
def test_temperature_scaling_matches_softmax_of_logits_over_temperature(temperature):
    logits = np.array([2.0, -1.0, 0.5, 3.25, -7.0, 0.0], dtype=np.float32)
    expected = softmax(logits.astype(np.float64) / temperature)
    got = distribution(plain(temperature=temperature), logits)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-300)


def test_a_tiny_temperature_concentrates_on_the_argmax_without_overflowing():
    logits = np.array([30.0, 29.0, -30.0], dtype=np.float32)
    np.testing.assert_array_equal(distribution(plain(temperature=1e-300), logits), [1, 0, 0])


def test_top_k_keeps_exactly_the_k_largest_and_renormalizes():
    probs = np.array([0.05, 0.3, 0.1, 0.4, 0.15])
    got = distribution(plain(top_k=3), log_probs(*probs))
    # the three largest: 0.4 (id 3), 0.3 (id 1), 0.15 (id 4), renormalized by 0.85
    np.testing.assert_allclose(got, [0, 0.3 / 0.85, 0, 0.4 / 0.85, 0.15 / 0.85], rtol=1e-6)
    assert kept(got) == {1, 3, 4}


def test_top_k_at_or_above_the_vocabulary_size_keeps_everything():
    logits = log_probs(0.1, 0.2, 0.3, 0.4)
    for k in (4, 5, 1000):
        np.testing.assert_allclose(distribution(plain(top_k=k), logits), [0.1, 0.2, 0.3, 0.4], rtol=1e-6)


@pytest.mark.parametrize(
    "top_p, expected_ids",
    [
        (0.8, {0, 1}),  # 0.5 + 0.3 reaches 0.8 exactly
        (0.81, {0, 1, 2}),
        (0.5, {0}),
        (0.01, {0}),  # always at least one
        (0.96, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_the_smallest_nucleus_that_reaches_top_p(top_p, expected_ids):
    probs = {0: 0.5, 1: 0.3, 2: 0.15, 3: 0.05}
    got = distribution(plain(top_p=top_p), log_probs(*probs.values()))
    assert kept(got) == expected_ids
    total = sum(probs[i] for i in expected_ids)
    np.testing.assert_allclose(got, [probs[i] / total if i in expected_ids else 0 for i in range(4)], rtol=1e-6)


def test_top_p_ranks_by_probability_not_by_token_id():
    # The same distribution shuffled: ids 3 (0.5) and 0 (0.3) form the 0.8 nucleus.
    got = distribution(plain(top_p=0.8), log_probs(0.3, 0.05, 0.15, 0.5))
    np.testing.assert_allclose(got, [0.375, 0, 0, 0.625], rtol=1e-6)


@pytest.mark.parametrize(
    "min_p, expected_ids",
    [
        (0.0, {0, 1, 2, 3}),
        (0.05, {0, 1, 2, 3}),  # threshold 0.025
        (0.2, {0, 1, 2}),  # threshold 0.1 drops 0.05
        (0.5, {0, 1}),  # threshold 0.25 drops 0.15
        (0.7, {0}),  # threshold 0.35 drops 0.3
        (1.0, {0}),  # only the most likely
    ],
)
def test_min_p_drops_tokens_below_min_p_times_the_top_probability(min_p, expected_ids):
    probs = {0: 0.5, 1: 0.3, 2: 0.15, 3: 0.05}
    got = distribution(plain(min_p=min_p), log_probs(*probs.values()))
    assert kept(got) == expected_ids
    total = sum(probs[i] for i in expected_ids)
    np.testing.assert_allclose(got, [probs[i] / total if i in expected_ids else 0 for i in range(4)], rtol=1e-6)


def test_top_p_counts_the_probabilities_renormalized_after_top_k():
    # top_k=4 leaves [0.4, 0.25, 0.15, 0.1] / 0.9 = [0.444, 0.278, 0.167, 0.111]; the first two
    # reach 0.7 (0.722). Before renormalization they would be 0.65 and need a third token.
    logits = log_probs(0.4, 0.25, 0.15, 0.1, 0.06, 0.04)
    got = distribution(plain(top_k=4, top_p=0.7), logits)
    np.testing.assert_allclose(got, [0.4 / 0.65, 0.25 / 0.65, 0, 0, 0, 0], rtol=1e-6)
    # min-p then works on the same distribution: 0.7 * 0.444 = 0.311 drops 0.278.
    np.testing.assert_allclose(distribution(plain(top_k=4, top_p=0.7, min_p=0.7), logits), [1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(
        distribution(plain(top_k=4, top_p=0.7, min_p=0.6), logits), [0.4 / 0.65, 0.25 / 0.65, 0, 0, 0, 0], rtol=1e-6
    )


def test_min_p_and_top_p_together_keep_the_smaller_of_their_two_sets():
    probs = (0.5, 0.3, 0.15, 0.05)
    assert kept(distribution(plain(top_p=0.81, min_p=0.5), log_probs(*probs))) == {0, 1}  # min-p binds
    assert kept(distribution(plain(top_p=0.8, min_p=0.05), log_probs(*probs))) == {0, 1}  # top-p binds


def test_temperature_is_applied_before_top_p():
    # At T=2, p ∝ sqrt([0.5, 0.3, 0.15, 0.05]) = [0.379, 0.294, 0.208, 0.120]: 0.8 needs three tokens.
    flat = np.sqrt([0.5, 0.3, 0.15, 0.05])
    flat /= flat.sum()
    got = distribution(plain(temperature=2.0, top_p=0.8), log_probs(0.5, 0.3, 0.15, 0.05))
    np.testing.assert_allclose(got, [*(flat[:3] / flat[:3].sum()), 0], rtol=1e-6)


def literal_filters(logits, temperature, top_k, top_p, min_p) -> np.ndarray:
    """The documented order, written the obvious way with full sorts: the reference for big vocabularies."""
    probs = softmax(np.asarray(logits, dtype=np.float64) / temperature)
    ranked = np.lexsort((np.arange(probs.size), -probs))  # most likely first, ties to the lowest id
    if 0 < top_k < probs.size:
        probs[ranked[top_k:]] = 0
        probs /= probs.sum()
    if top_p < 1:
        cumulative = np.cumsum(probs[ranked])
        n = int(np.argmax(cumulative >= top_p - TOP_P_ROUNDING_SLACK)) + 1
        probs[ranked[n:]] = 0
        probs /= probs.sum()
    probs[probs < min_p * probs.max()] = 0
    return probs / probs.sum()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [
        (0.8, 40, 0.95, 0.05),  # the defaults
        (1.0, 0, 0.9, 0.0),  # top-p alone: the nucleus is found among the 1024 most likely
        (3.0, 0, 0.95, 0.0),  # a flat distribution: the nucleus needs the full sort
        (0.5, 5000, 0.5, 0.0),
        (1.0, 1, 1.0, 0.0),
        (1.0, 0, 1.0, 0.02),
        (2.0, 30000, 0.99, 0.001),
    ],
)
def test_a_50k_vocabulary_gives_the_same_distribution_as_the_literal_order_with_full_sorts(
    ties, temperature, top_k, top_p, min_p
):
    logits = np.random.default_rng(3).normal(scale=4.0, size=50_000)
    if ties:  # many equal logits, also at the top-k and nucleus boundaries
        logits = np.round(logits)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    got = Sampler(params, logits.size).probabilities(logits.astype(np.float32), [])
    expected = literal_filters(logits.astype(np.float32), temperature, top_k, top_p, min_p)
    assert kept(got) == kept(expected)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-300)


# --- penalties and bias ----------------------------------------------------------------------

LOGITS = np.array([2.0, -1.0, 0.5, 3.0, -2.0], dtype=np.float32)


def test_repetition_penalty_divides_positive_logits_and_multiplies_negative_ones():
    got = distribution(plain(repetition_penalty=2.0), LOGITS, history=[0, 1])
    np.testing.assert_allclose(got, softmax([1.0, -2.0, 0.5, 3.0, -2.0]), rtol=1e-12)
    # below 1 it rewards repeats: 2 / 0.5 = 4, -1 * 0.5 = -0.5
    got = distribution(plain(repetition_penalty=0.5), LOGITS, history=[0, 1])
    np.testing.assert_allclose(got, softmax([4.0, -0.5, 0.5, 3.0, -2.0]), rtol=1e-12)


def test_repetition_penalty_applies_once_however_often_a_token_repeats():
    got = distribution(plain(repetition_penalty=2.0), LOGITS, history=[0, 0, 0, 0])
    np.testing.assert_allclose(got, softmax([1.0, -1.0, 0.5, 3.0, -2.0]), rtol=1e-12)


@pytest.mark.parametrize(
    "window, penalized",
    [
        (1, {1}),  # only the last token
        (2, {0, 1}),
        (3, {3, 0, 1}),
        (4, {3, 0, 1}),  # longer than the history: all of it
        (-1, {3, 0, 1}),  # all of it
        (0, set()),  # off
    ],
)
def test_penalties_only_touch_tokens_in_the_window_of_the_last_n_tokens(window, penalized):
    history = [3, 0, 1]
    expected = [x / 2 if (i in penalized and x > 0) else x * 2 if i in penalized else x for i, x in enumerate(LOGITS)]
    got = distribution(plain(repetition_penalty=2.0, penalty_window=window), LOGITS, history)
    np.testing.assert_allclose(got, softmax(expected), rtol=1e-12)


def test_the_whole_history_counts_when_the_window_is_minus_one_even_if_it_is_long():
    history = [2] + [4] * 500  # token 2 is 501 tokens back
    got = distribution(plain(repetition_penalty=2.0, penalty_window=-1), LOGITS, history)
    np.testing.assert_allclose(got, softmax([2.0, -1.0, 0.25, 3.0, -4.0]), rtol=1e-12)
    got = distribution(plain(repetition_penalty=2.0, penalty_window=64), LOGITS, history)
    np.testing.assert_allclose(got, softmax([2.0, -1.0, 0.5, 3.0, -4.0]), rtol=1e-12)


def test_presence_penalty_subtracts_once_per_token_present():
    got = distribution(plain(presence_penalty=0.5), LOGITS, history=[0, 0, 0, 2])
    np.testing.assert_allclose(got, softmax([1.5, -1.0, 0.0, 3.0, -2.0]), rtol=1e-12)


def test_frequency_penalty_subtracts_once_per_occurrence():
    got = distribution(plain(frequency_penalty=0.25), LOGITS, history=[0, 0, 0, 2])
    np.testing.assert_allclose(got, softmax([1.25, -1.0, 0.25, 3.0, -2.0]), rtol=1e-12)


def test_negative_presence_and_frequency_penalties_encourage_repeats():
    got = distribution(plain(presence_penalty=-1.0, frequency_penalty=-0.5), LOGITS, history=[4, 4])
    np.testing.assert_allclose(got, softmax([2.0, -1.0, 0.5, 3.0, 0.0]), rtol=1e-12)


def test_all_three_penalties_combine_repetition_first_then_the_subtractions():
    # token 0 (2.0, seen twice): 2 / 2 - 2 * 0.25 - 0.5 = 0;  token 1 (-1.0, once): -2 - 0.25 - 0.5 = -2.75
    params = plain(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = distribution(params, LOGITS, history=[0, 1, 0])
    np.testing.assert_allclose(got, softmax([0.0, -2.75, 0.5, 3.0, -2.0]), rtol=1e-12)


def test_the_history_may_be_a_tuple_a_numpy_array_or_a_deque():
    params = plain(repetition_penalty=2.0, penalty_window=2)
    expected = softmax([1.0, -2.0, 0.5, 3.0, -2.0])
    sampler = Sampler(params, 5)
    for history in ((3, 0, 1), np.array([3, 0, 1]), deque([3, 0, 1])):
        np.testing.assert_allclose(sampler.probabilities(LOGITS, history), expected, rtol=1e-12)


def test_logit_bias_adds_to_the_logit():
    got = distribution(plain(logit_bias={1: 2.5, 3: -1.0}), LOGITS)
    np.testing.assert_allclose(got, softmax([2.0, 1.5, 0.5, 2.0, -2.0]), rtol=1e-12)


def test_logit_bias_is_applied_before_the_repetition_penalty():
    # (-2 + 3) / 2 = 0.5; penalizing first would give -2 * 2 + 3 = -1.
    got = distribution(plain(logit_bias={4: 3.0}, repetition_penalty=2.0), LOGITS, history=[4])
    np.testing.assert_allclose(got, softmax([2.0, -1.0, 0.5, 3.0, 0.5]), rtol=1e-12)


def test_a_bias_of_minus_infinity_bans_the_token():
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, logit_bias={3: -math.inf}, seed=0)
    sampler = Sampler(params, 5)
    probs = sampler.probabilities(LOGITS, [])
    assert probs[3] == 0
    np.testing.assert_allclose(probs, softmax([2.0, -1.0, 0.5, -np.inf, -2.0]), rtol=1e-12)
    assert 3 not in {sampler(LOGITS, []) for _ in range(2000)}
    assert Sampler(params.with_overrides(temperature=0.0), 5)(LOGITS, []) == 0  # greedy takes the runner-up


def test_banning_every_token_is_an_error_that_says_why():
    sampler = Sampler(plain(logit_bias={0: -math.inf, 1: -math.inf}), 2)
    with pytest.raises(EdgeLLMError, match="-inf"):
        sampler(np.zeros(2, dtype=np.float32), [])


def test_nan_logits_are_an_error_not_a_silent_pick():
    logits = LOGITS.copy()
    logits[2] = np.nan
    for params in (plain(), SamplingParams.greedy_params()):
        with pytest.raises(EdgeLLMError, match="NaN"):
            Sampler(params, 5)(logits, [])


# --- the draw --------------------------------------------------------------------------------


def test_20k_seeded_draws_match_the_computed_probabilities():
    probs = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    sampler = Sampler(plain(seed=2024), 5)
    logits = log_probs(*probs)
    np.testing.assert_allclose(sampler.probabilities(logits, []), probs, rtol=1e-6)
    draws = [sampler(logits, []) for _ in range(20_000)]
    frequencies = np.bincount(draws, minlength=5) / len(draws)
    assert np.abs(frequencies - probs).max() < 0.01, frequencies


def test_20k_seeded_draws_after_filtering_never_pick_a_dropped_token():
    probs = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=4, top_p=0.8, min_p=0.0, seed=5), 5)
    logits = log_probs(*probs)
    # top-4 / 0.95 = [0.421, 0.263, 0.211, 0.105]: cumulative 0.684 < 0.8 <= 0.895, so three tokens remain.
    expected = np.array([0.4, 0.25, 0.2, 0, 0]) / 0.85
    np.testing.assert_allclose(sampler.probabilities(logits, []), expected, rtol=1e-6)
    frequencies = np.bincount([sampler(logits, []) for _ in range(20_000)], minlength=5) / 20_000
    assert frequencies[3] == frequencies[4] == 0
    assert np.abs(frequencies - expected).max() < 0.01, frequencies


# --- inputs ----------------------------------------------------------------------------------


def test_float32_logits_give_float64_probabilities_and_are_left_untouched():
    logits = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    before = logits.copy()
    got = Sampler(plain(logit_bias={0: 5.0}, repetition_penalty=3.0), 3).probabilities(logits, [2])
    assert got.dtype == np.float64 and got.shape == (3,)
    np.testing.assert_array_equal(logits, before)


@pytest.mark.parametrize("shape", [(4,), (6,), (1, 5), ()])
def test_logits_of_the_wrong_shape_are_rejected_with_the_expected_length(shape):
    with pytest.raises(InvalidSettingError, match=r"vocab_size=5"):
        Sampler(plain(), 5)(np.zeros(shape, dtype=np.float32), [])


def test_history_ids_outside_the_vocabulary_are_rejected():
    with pytest.raises(InvalidSettingError, match="token id 9"):
        Sampler(plain(repetition_penalty=1.1), 5)(LOGITS, [0, 9])


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.5),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "0.7"),
        ("top_p", 1.5),
        ("top_p", 0.0),
        ("top_p", math.nan),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", True),
        ("min_p", 1.5),
        ("min_p", -0.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", math.nan),
        ("penalty_window", -2),
        ("seed", -1),
        ("seed", 1.5),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {"5": 1.0}),
        ("logit_bias", {1.0: 1.0}),
        ("logit_bias", {5: math.nan}),
        ("logit_bias", {5: math.inf}),
        ("logit_bias", {5: 101.0}),
        ("logit_bias", [(5, 1.0), (5, 2.0)]),
        ("logit_bias", 5),
    ],
)
def test_an_invalid_setting_raises_an_error_that_names_the_field_and_value(field, value):
    with pytest.raises(InvalidSettingError) as caught:
        SamplingParams(**{field: value})
    message = str(caught.value)
    assert f"{field}=" in message
    assert "must" in message  # the allowed range or type
    assert caught.value.hint  # what to do
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("temperature", -0.5, ">= 0"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_k", -1, ">= 0"),
        ("min_p", 1.5, "[0, 1]"),
        ("repetition_penalty", 0.0, "> 0"),
    ],
)
def test_the_error_states_the_allowed_range(field, value, allowed):
    with pytest.raises(InvalidSettingError) as caught:
        SamplingParams(**{field: value})
    assert f"{field}={value!r}" in str(caught.value) and allowed in str(caught.value)


def test_a_logit_bias_id_outside_the_vocabulary_is_rejected_when_the_sampler_is_built():
    params = SamplingParams(logit_bias={3: 1.0, 50: -2.0})  # fine without a vocabulary
    Sampler(params, 51)
    with pytest.raises(InvalidSettingError, match=r"logit_bias=.*50.*outside the vocabulary \[0, 49\]"):
        Sampler(params, 50)


def test_logit_bias_is_stored_as_sorted_pairs_so_params_are_hashable_and_compare_by_value():
    a = SamplingParams(logit_bias={7: 1.0, 2: -math.inf})
    b = SamplingParams(logit_bias={2: -math.inf, 7: 1})
    assert a.logit_bias == ((2, -math.inf), (7, 1.0))
    assert a == b and hash(a) == hash(b)
    assert dict(a.logit_bias) == {2: -math.inf, 7: 1.0}
    assert SamplingParams().logit_bias == ()


def test_with_overrides_changes_the_named_fields_and_validates_them():
    base = SamplingParams(seed=3, logit_bias={1: 2.0})
    changed = base.with_overrides(temperature=0.2, top_k=5)
    assert (changed.temperature, changed.top_k, changed.seed, changed.logit_bias) == (0.2, 5, 3, ((1, 2.0),))
    assert base.temperature == 0.8  # frozen: the original is unchanged
    with pytest.raises(InvalidSettingError, match="top_p=0.0"):
        base.with_overrides(top_p=0.0)
    with pytest.raises(InvalidSettingError, match="unknown sampling setting.*temp\\b"):
        base.with_overrides(temp=0.5)


def test_greedy_params_is_temperature_zero_with_other_settings_kept():
    params = SamplingParams.greedy_params(repetition_penalty=1.3)
    assert params.greedy and params.temperature == 0.0 and params.repetition_penalty == 1.3


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    params = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(10), logit_bias={np.int32(4): np.float64(1.0)})
    assert type(params.temperature) is float and type(params.top_k) is int
    assert params.logit_bias == ((4, 1.0),) and type(params.logit_bias[0][0]) is int
