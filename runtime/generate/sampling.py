"""Turn one position's logits into the next token id: SamplingParams (the settings) and Sampler.

The order of operations, for logits `x` (float, [vocab]) and the token history (prompt + generated):

  1. logit bias          x[id] += bias[id]; a bias of -inf bans the token.
  2. penalties           over the last `penalty_window` tokens of the history (-1 = all, 0 = none),
                         for each distinct token t seen there `count[t]` times:
                           repetition (HF / llama.cpp): x[t] /= r if x[t] > 0 else x[t] *= r
                           frequency and presence (OpenAI): x[t] -= count[t] * f + p
  3. greedy              temperature 0: the argmax (ties go to the lowest id), as a one-hot.
  4. temperature         softmax(x / T), in float64 whatever the dtype of the logits.
  5. top-k               keep exactly the k largest (ties at the k-th value go to the lowest ids).
  6. top-p               keep the smallest set of most likely tokens whose cumulative probability
                         reaches top_p (always at least the most likely one).
  7. min-p               drop tokens with p < min_p * p_max.
  8. renormalize         the kept probabilities sum to 1.
  9. draw                inverse CDF with the Sampler's own `numpy.random.Generator`, seeded from
                         `seed` (OS entropy when None); one uniform number per sampled token, so the
                         same seed, settings and logits give the same tokens.

Steps 6 and 7 both keep a prefix of the tokens ranked by probability, computed from the same
distribution (renormalizing between them does not change p / p_max), so the Sampler applies min-p
first: it is one pass over the vocabulary and leaves top-p only the survivors to sort. The result is
the same as in the order above.

The Sampler copies the logits once (into float64) and works in place on that copy. It is called once
per token over vocabularies of ~50k, so nothing sorts the whole vocabulary when it can be avoided:
top-k is a partial sort (np.partition) of a pre-cut, and top-p sorts only the candidates left by
top-k and min-p, or the 1024 most likely when those already reach top_p.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgellm.errors import EdgeLLMError, InvalidSettingError

# Bias range as in OpenAI's API; -inf is also accepted and bans the token.
MAX_ABS_LOGIT_BIAS = 100.0
# OpenAI's range for presence_penalty and frequency_penalty.
MAX_ABS_OPENAI_PENALTY = 2.0
# Top-p counts a nucleus as reaching top_p when its cumulative probability is within this of it:
# probabilities that add to exactly top_p on paper (0.5 + 0.3 = 0.8) come out of a softmax a few
# ulps short, and a nucleus must not grow by a token because of rounding.
TOP_P_ROUNDING_SLACK = 1e-9
# The nucleus is usually among this many most likely tokens; top-p first tries sorting only them.
NUCLEUS_FIRST_TRY = 1024


def _setting_error(name: str, value: object, allowed: str, hint: str | None = None) -> InvalidSettingError:
    return InvalidSettingError(f"sampling setting {name}={value!r} is invalid: {allowed}", hint)


def _real(name: str, value: object, allowed: str, hint: str) -> float:
    """`value` as a float; rejects bools, strings and NaN (every range check is false for NaN)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _setting_error(name, value, f"must be a number; {allowed}", hint)
    value = float(value)
    if math.isnan(value):
        raise _setting_error(name, value, f"must be a number, not NaN; {allowed}", hint)
    return value


def _integer(name: str, value: object, allowed: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _setting_error(name, value, f"must be an integer; {allowed}", hint)
    return int(value)


def _logit_bias_pairs(value: object) -> tuple[tuple[int, float], ...]:
    """A {token_id: bias} mapping (or (id, bias) pairs) as sorted pairs, checked except against the vocab."""
    hint = "pass a dict {token_id: bias} with int ids >= 0 and biases in [-100, 100], or -inf to ban a token"
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        items = list(value)
        if not all(isinstance(item, tuple) and len(item) == 2 for item in items):
            raise _setting_error("logit_bias", value, "must map token ids to biases", hint)
    else:
        raise _setting_error("logit_bias", value, "must map token ids to biases", hint)
    pairs: dict[int, float] = {}
    for token, bias in items:
        if isinstance(token, str):
            raise _setting_error(
                "logit_bias",
                value,
                f"token id {token!r} is a string, ids must be integers",
                "JSON object keys are strings: convert them with int(key)",
            )
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise _setting_error("logit_bias", value, f"token id {token!r} must be an integer >= 0", hint)
        if int(token) in pairs:
            raise _setting_error("logit_bias", value, f"token id {token} appears twice; each id must appear once", hint)
        if (
            isinstance(bias, bool)
            or not isinstance(bias, numbers.Real)
            or math.isnan(bias)
            or not (bias == -math.inf or -MAX_ABS_LOGIT_BIAS <= bias <= MAX_ABS_LOGIT_BIAS)
        ):
            raise _setting_error(
                "logit_bias", value, f"bias {bias!r} for token {token} must be in [-100, 100] or -inf", hint
            )
        pairs[int(token)] = float(bias)
    return tuple(sorted(pairs.items()))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Validated once, here; the Sampler checks only what needs the vocab."""

    temperature: float = 0.8  # 0 = greedy (argmax after bias and penalties)
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # (0, 1]; 1 = off
    min_p: float = 0.05  # [0, 1]; 0 = off
    repetition_penalty: float = 1.0  # > 0; 1 = off. Positive logits divided, negative multiplied
    presence_penalty: float = 0.0  # [-2, 2]; subtracted once from each token present in the window
    frequency_penalty: float = 0.0  # [-2, 2]; subtracted once per occurrence in the window
    penalty_window: int = 64  # last N tokens of the history (prompt + generated) penalized; 0 = off, -1 = all
    # token id -> added to its logit, in [-100, 100] or -inf to ban. Pass a dict; it is stored as
    # sorted (id, bias) pairs so that the params stay immutable and hashable (dict(...) gives it back).
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()
    seed: int | None = None  # same seed + same settings + same logits = same tokens; None = OS entropy

    def __post_init__(self) -> None:
        def normalize(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        temperature = _real(
            "temperature",
            self.temperature,
            "must be finite and >= 0 (0 = greedy)",
            "use 0 for greedy decoding, or a value such as 0.7",
        )
        if not (0.0 <= temperature < math.inf):
            raise _setting_error(
                "temperature",
                self.temperature,
                "must be finite and >= 0 (0 = greedy)",
                "use 0 for greedy decoding, or a value such as 0.7",
            )
        normalize("temperature", temperature)

        top_k = _integer("top_k", self.top_k, "must be >= 0 (0 = off)", "use 0 to turn top-k off, or e.g. 40")
        if top_k < 0:
            raise _setting_error("top_k", self.top_k, "must be >= 0 (0 = off)", "use 0 to turn top-k off, or e.g. 40")
        normalize("top_k", top_k)

        top_p = _real("top_p", self.top_p, "must be in (0, 1] (1 = off)", "use 1.0 to turn top-p off, or e.g. 0.95")
        if not (0.0 < top_p <= 1.0):
            raise _setting_error(
                "top_p", self.top_p, "must be in (0, 1] (1 = off)", "use 1.0 to turn top-p off, or e.g. 0.95"
            )
        normalize("top_p", top_p)

        min_p = _real("min_p", self.min_p, "must be in [0, 1] (0 = off)", "use 0 to turn min-p off, or e.g. 0.05")
        if not (0.0 <= min_p <= 1.0):
            raise _setting_error(
                "min_p", self.min_p, "must be in [0, 1] (0 = off)", "use 0 to turn min-p off, or e.g. 0.05"
            )
        normalize("min_p", min_p)

        penalty = _real(
            "repetition_penalty",
            self.repetition_penalty,
            "must be finite and > 0 (1 = off)",
            "use 1.0 to turn it off; values such as 1.1 discourage repeats",
        )
        if not (0.0 < penalty < math.inf):
            raise _setting_error(
                "repetition_penalty",
                self.repetition_penalty,
                "must be finite and > 0 (1 = off)",
                "use 1.0 to turn it off; values such as 1.1 discourage repeats",
            )
        normalize("repetition_penalty", penalty)

        for name in ("presence_penalty", "frequency_penalty"):
            value = _real(
                name,
                getattr(self, name),
                "must be in [-2, 2] (0 = off)",
                "use 0 to turn it off; positive values discourage repeats",
            )
            if not (-MAX_ABS_OPENAI_PENALTY <= value <= MAX_ABS_OPENAI_PENALTY):
                raise _setting_error(
                    name,
                    getattr(self, name),
                    "must be in [-2, 2] (0 = off)",
                    "use 0 to turn it off; positive values discourage repeats",
                )
            normalize(name, value)

        window = _integer(
            "penalty_window",
            self.penalty_window,
            "must be >= -1 (0 = off, -1 = whole history)",
            "use e.g. 64 for the last 64 tokens",
        )
        if window < -1:
            raise _setting_error(
                "penalty_window",
                self.penalty_window,
                "must be >= -1 (0 = off, -1 = whole history)",
                "use e.g. 64 for the last 64 tokens",
            )
        normalize("penalty_window", window)

        normalize("logit_bias", _logit_bias_pairs(self.logit_bias))

        if self.seed is not None:
            seed = _integer("seed", self.seed, "must be an integer >= 0 or None", "use None for a random seed")
            if seed < 0:
                raise _setting_error("seed", self.seed, "must be an integer >= 0 or None", "use None for a random seed")
            normalize("seed", seed)

    @property
    def greedy(self) -> bool:
        """Temperature 0: the argmax of the biased, penalized logits; no randomness."""
        return self.temperature == 0.0

    def with_overrides(self, **overrides: object) -> SamplingParams:
        """A copy with some fields changed, validated like a new one."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise InvalidSettingError(
                f"unknown sampling setting(s): {', '.join(unknown)}", f"known settings: {', '.join(names)}"
            )
        return dataclasses.replace(self, **overrides)

    @classmethod
    def greedy_params(cls, **overrides: object) -> SamplingParams:
        """Greedy decoding (temperature 0); bias and penalties still apply if given."""
        return cls(**{"temperature": 0.0, **overrides})


def _check_top(top: float) -> None:
    """The largest logit after bias and penalties must be finite: NaN or +inf is a broken model."""
    if math.isnan(top) or top == math.inf:
        raise EdgeLLMError(
            f"the logits contain {'NaN' if math.isnan(top) else '+inf'} after bias and penalties",
            "the model's output is broken (a kernel overflow or damaged weights?); try EDGELLM_KERNELS=ref",
        )
    if top == -math.inf:
        raise EdgeLLMError(
            "every token has a logit of -inf: nothing can be sampled",
            "logit_bias bans every token; remove some -inf biases",
        )


class Sampler:
    """Draws token ids from logits under fixed SamplingParams; owns the random generator.

    One Sampler per generated sequence: its generator advances by one uniform number per sampled
    (non-greedy) token, so a sequence of draws is reproducible from the seed.
    """

    def __init__(self, params: SamplingParams, vocab_size: int):
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size <= 0:
            raise InvalidSettingError(
                f"vocab_size={vocab_size!r} is invalid: must be an integer > 0",
                "pass the model's vocabulary size (the logits' length)",
            )
        self.params = params
        self.vocab_size = int(vocab_size)
        too_large = [token for token, _ in params.logit_bias if token >= self.vocab_size]
        if too_large:
            raise _setting_error(
                "logit_bias",
                dict(params.logit_bias),
                f"token id(s) {', '.join(map(str, too_large))} are outside the vocabulary [0, {self.vocab_size - 1}]",
                f"the model has {self.vocab_size} tokens",
            )
        self._bias_ids = np.array([token for token, _ in params.logit_bias], dtype=np.intp)  # [n_bias]
        self._bias_values = np.array([bias for _, bias in params.logit_bias], dtype=np.float64)  # [n_bias]
        self._penalties_on = params.penalty_window != 0 and (
            params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        )
        self._rng = np.random.default_rng(params.seed)
        self._plain_greedy = params.greedy and not self._bias_ids.size and not self._penalties_on

    def __repr__(self) -> str:
        return f"Sampler({self.params!r}, vocab_size={self.vocab_size})"

    def probabilities(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """The final distribution the next token is drawn from: float64 [vocab], one-hot when greedy.

        Does not advance the random generator.
        """
        ids, probs = self._candidates(logits, history)
        if ids is None:
            return probs  # already [vocab], our own array
        out = np.zeros(self.vocab_size, dtype=np.float64)  # [vocab]
        out[ids] = probs
        return out

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        """The next token id, drawn from `probabilities(logits, history)`."""
        if self._plain_greedy:  # the argmax of the logits as they are: no float64 copy of the vocabulary
            x = self._checked_shape(logits)
            i = int(np.argmax(x))  # the same first (lowest) id on ties as _candidates; the first NaN if any
            _check_top(float(x[i]))  # so one pass finds the max and checks every logit
            return i
        ids, probs = self._candidates(logits, history)
        if probs.size == 1:  # greedy, or a filter left a single token: no draw, the generator stays put
            return int(ids[0])
        cumulative = np.cumsum(probs)  # [n]
        # side="right" and probabilities > 0: candidate i is picked for u in [cum[i-1], cum[i]).
        i = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
        i = min(i, probs.size - 1)  # u * total can round up to total
        return i if ids is None else int(ids[i])

    def _candidates(self, logits: np.ndarray, history: Sequence[int]) -> tuple[np.ndarray | None, np.ndarray]:
        """(ids [n], probabilities [n]) of the tokens that can be drawn: n >= 1, every p > 0, sum 1.

        ids is None when every token of the vocabulary can be drawn (probabilities are then [vocab]).
        """
        p = self.params
        x = self._scores(logits, history)  # float64 [vocab], our own copy
        top = float(x.max())  # NaN propagates through max, so this one pass checks every logit
        _check_top(top)

        if p.greedy:
            return np.array([int(np.argmax(x))], dtype=np.intp), np.ones(1)  # argmax: first (lowest) id on ties

        # top-k on the logits: dividing by T > 0 keeps the order, so this equals top-k after temperature.
        if 0 < p.top_k < self.vocab_size:
            ids = _top_k_ids(x, p.top_k)  # [k], ascending
            scores = x[ids]  # [k]
        else:
            ids = None  # every token
            scores = x  # [vocab]

        # Softmax over the candidates, in place. `top` is their max too (top-k keeps the argmax).
        # Subtracting before dividing keeps a tiny temperature from overflowing.
        scores -= top
        scores /= p.temperature
        np.exp(scores, out=scores)
        scores /= scores.sum()
        probs = scores

        # min-p (before top-p, see the module docstring); also drops tokens whose probability is 0.
        keep = probs >= p.min_p * probs.max() if p.min_p > 0 else probs > 0  # [n] bool
        if not keep.all():
            kept = np.flatnonzero(keep)
            ids = kept if ids is None else ids[kept]
            probs = probs[kept]

        if p.top_p < 1.0 and probs.size > 1:
            nucleus = _nucleus(probs, p.top_p - TOP_P_ROUNDING_SLACK)  # [n] positions in ids, ascending
            ids = nucleus if ids is None else ids[nucleus]
            probs = probs[nucleus]

        probs /= probs.sum()
        return ids, probs

    def _checked_shape(self, logits: np.ndarray) -> np.ndarray:
        shape = np.shape(logits)
        if shape != (self.vocab_size,):
            hint = (
                "pass one position's logits, e.g. logits[-1]"
                if len(shape) > 1
                else "build the Sampler with the model's vocab_size"
            )
            raise InvalidSettingError(
                f"logits have shape {shape}, expected ({self.vocab_size},) (vocab_size={self.vocab_size})", hint
            )
        return np.asarray(logits)

    def _scores(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """Logits + bias, penalized: a float64 [vocab] copy that the caller may change in place."""
        x = np.array(self._checked_shape(logits), dtype=np.float64)  # [vocab] the one copy
        if self._bias_ids.size:
            x[self._bias_ids] += self._bias_values
        if self._penalties_on:
            self._penalize(x, history)
        return x

    def _penalize(self, x: np.ndarray, history: Sequence[int]) -> None:
        p = self.params
        window = history
        if p.penalty_window > 0 and len(history) > p.penalty_window:
            try:
                window = history[-p.penalty_window :]
            except TypeError:  # a sequence without slicing, e.g. a deque
                window = list(itertools.islice(history, len(history) - p.penalty_window, None))
        if len(window) == 0:
            return
        tokens = np.asarray(window)  # [window]
        if tokens.dtype.kind not in "iu":
            raise InvalidSettingError(
                f"history must hold integer token ids, got dtype {tokens.dtype}",
                "pass the prompt and generated token ids",
            )
        seen, counts = np.unique(tokens, return_counts=True)  # [distinct], ascending
        if seen[0] < 0 or seen[-1] >= self.vocab_size:
            bad = seen[0] if seen[0] < 0 else seen[-1]
            raise InvalidSettingError(
                f"history holds token id {int(bad)}, outside the vocabulary [0, {self.vocab_size - 1}]",
                "pass token ids from this model's tokenizer",
            )
        seen = seen.astype(np.intp)
        values = x[seen]  # [distinct] a copy
        if p.repetition_penalty != 1.0:
            values = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        values -= counts * p.frequency_penalty + p.presence_penalty
        x[seen] = values


def _kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest of values [n] (1 <= k <= n), partially sorting as few of them as it can.

    np.partition over a whole 49k vocabulary costs about half a millisecond per token. The k-th largest
    of an evenly strided sample is a floor that at least k values reach, so the answer is among the
    values at or above it: about sqrt(n * k) values are partitioned twice instead of n once.
    """
    stride = int(math.sqrt(values.size / k))
    if stride > 1:
        sample = values[::stride]  # [>= sqrt(n * k) >= k]
        floor = np.partition(sample, sample.size - k)[sample.size - k]
        values = values[values >= floor]  # [>= k], holds every one of the k largest
    return float(np.partition(values, values.size - k)[values.size - k])


def _top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    """Ids of exactly the k largest values of x [vocab], ascending; ties at the k-th value go to the lowest ids."""
    kth = _kth_largest(x, k)
    above = np.flatnonzero(x > kth)
    tied = np.flatnonzero(x == kth)[: k - above.size]
    return np.sort(np.concatenate([above, tied]))


def _nucleus(probs: np.ndarray, target: float) -> np.ndarray:
    """Positions [n] (ascending) of the smallest set of the most likely probs [m] whose sum reaches target.

    Ranks by probability, ties to the lower position (a stable sort), and keeps at least one.
    A stable sort of a whole vocabulary costs milliseconds, so it first tries the NUCLEUS_FIRST_TRY
    most likely tokens (all of them tied at the cut too, so the ranking inside is the same) and sorts
    everything only when those do not reach the target.
    """
    pool = None  # [p] positions to rank, ascending; None = all
    if probs.size > NUCLEUS_FIRST_TRY:
        head = np.flatnonzero(probs >= _kth_largest(probs, NUCLEUS_FIRST_TRY))
        if probs[head].sum() >= target:
            pool = head
    ranked = probs if pool is None else probs[pool]
    order = np.argsort(-ranked, kind="stable")  # most likely first
    n = int(np.searchsorted(np.cumsum(ranked[order]), target, side="left")) + 1  # first prefix reaching target
    chosen = order[:n]
    return np.sort(chosen if pool is None else pool[chosen])
