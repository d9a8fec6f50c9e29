"""Conditional log-likelihood (LLaDA's ELBO estimator): exact where it can be, unbiased, reproducible."""

import copy
import itertools
import math

import pytest
import torch

from dllm.likelihood import log_likelihood


@pytest.fixture(scope="module")
def model64(talkative_model):
    return copy.deepcopy(talkative_model).double()


PROMPT = [9, 12, 15, 20, 11]


def _masked_logp(model, prompt, answer, masked: set[int]) -> list[float]:
    """log p(answer_i | prompt, answer with `masked` positions masked), for i in masked (sorted)."""
    mask = model.config.mask_token_id
    ids = prompt + [mask if i in masked else t for i, t in enumerate(answer)]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    return [logp[len(prompt) + i, answer[i]].item() for i in sorted(masked)]


def exact_elbo(model, prompt, answer) -> float:
    """The bound by enumeration: l uniform in 1..L, then every subset of l positions equally likely."""
    n = len(answer)
    total = 0.0
    for size in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), size))
        inner = sum(sum(_masked_logp(model, prompt, answer, set(s))) for s in subsets) / len(subsets)
        total += (n / size) * inner / n
    return total


def test_one_token_continuation_is_its_exact_log_probability(model64):
    result = log_likelihood(model64, PROMPT, [17], mc_samples=5)
    assert result.value == pytest.approx(_masked_logp(model64, PROMPT, [17], {0})[0], abs=1e-9)
    assert result.std_error == pytest.approx(0.0, abs=1e-12) and result.tokens == 1


def test_monte_carlo_estimate_converges_to_the_enumerated_bound(model64):
    answer = [14, 22, 8, 30]
    exact = exact_elbo(model64, PROMPT, answer)
    result = log_likelihood(model64, PROMPT, answer, mc_samples=2000, batch_size=256, seed=1)
    assert result.std_error > 0
    assert abs(result.value - exact) < 4 * result.std_error
    assert result.value < 0 and math.isfinite(result.value)


def test_draws_depend_on_the_seed_not_on_the_batch_size(model64):
    answer = [14, 22, 8, 30, 12, 19]
    a = log_likelihood(model64, PROMPT, answer, mc_samples=40, batch_size=40, seed=3)
    b = log_likelihood(model64, PROMPT, answer, mc_samples=40, batch_size=7, seed=3)
    c = log_likelihood(model64, PROMPT, answer, mc_samples=40, batch_size=40, seed=4)
    assert a.value == pytest.approx(b.value, abs=1e-9) and a.std_error == pytest.approx(b.std_error, abs=1e-9)
    assert c.value != pytest.approx(a.value, abs=1e-9)


def test_bad_inputs_are_refused_clearly(model64):
    vocab = model64.config.embedding_size
    with pytest.raises(ValueError, match="continuation is empty"):
        log_likelihood(model64, PROMPT, [])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        log_likelihood(model64, PROMPT, [vocab])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        log_likelihood(model64, [-1], [3])
    with pytest.raises(ValueError, match="mc_samples"):
        log_likelihood(model64, PROMPT, [3], mc_samples=0)
    with pytest.raises(ValueError, match="at most"):
        log_likelihood(model64, PROMPT, [3] * model64.config.max_sequence_length)
