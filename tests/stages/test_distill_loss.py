"""The chunked KD loss equals a naive full-logit reference, in value and in gradient."""

import pytest
import torch
import torch.nn.functional as F

from compressor.stages.distill.loss import distill_loss, divergence, kd_loss
from compressor.stages.distill.spec import KDLoss

VOCAB, WIDTH_S, WIDTH_T, TOKENS = 97, 24, 32, 50  # 50 tokens in chunks of 16: the last chunk is ragged


def reference(h_s, h_t, targets, head_s, head_t, kind, t, alpha):
    """Textbook formulas over whole logits."""
    p_s, p_t = F.softmax(head_s(h_s) / t, -1), F.softmax(head_t(h_t) / t, -1)
    if kind == "forward_kl":
        kl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    else:
        kl = (p_s * (p_s.log() - p_t.log())).sum(-1).mean()
    ce = F.cross_entropy(head_s(h_s), targets)
    return (1 - alpha) * t * t * kl + alpha * ce, ce


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    head_s, head_t = torch.nn.Linear(WIDTH_S, VOCAB, bias=False), torch.nn.Linear(WIDTH_T, VOCAB, bias=False)
    with torch.no_grad():
        head_s.weight.copy_(torch.randn(VOCAB, WIDTH_S, generator=gen) * 0.3)
        head_t.weight.copy_(torch.randn(VOCAB, WIDTH_T, generator=gen) * 0.3)
    h_s = (torch.randn(TOKENS, WIDTH_S, generator=gen)).requires_grad_()
    h_t = torch.randn(TOKENS, WIDTH_T, generator=gen)
    return h_s, h_t, torch.randint(0, VOCAB, (TOKENS,), generator=gen), head_s, head_t


@pytest.mark.parametrize(
    "kind,temperature,alpha",
    [("forward_kl", 1.0, 0.0), ("reverse_kl", 1.0, 0.0), ("forward_kl", 2.0, 0.3), ("reverse_kl", 0.5, 0.7)],
)
def test_chunked_loss_matches_full_logit_reference(kind, temperature, alpha):
    h_s, h_t, targets, head_s, head_t = inputs()
    want, want_ce = reference(h_s, h_t, targets, head_s, head_t, kind, temperature, alpha)
    want_grads = torch.autograd.grad(want, [h_s, head_s.weight])

    spec = KDLoss(kind=kind, temperature=temperature, alpha=alpha, chunk_tokens=16)
    got = kd_loss(h_s, h_t, targets, head_s, head_t, spec)
    got_grads = torch.autograd.grad(got.loss, [h_s, head_s.weight])

    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.ce, want_ce.detach(), rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert head_t.weight.grad is None  # the teacher stays frozen


def test_chunk_size_does_not_change_the_result():
    h_s, h_t, targets, head_s, head_t = inputs(seed=1)
    results = []
    for chunk in (7, 50, 4096):
        terms = kd_loss(h_s, h_t, targets, head_s, head_t, KDLoss(alpha=0.5, chunk_tokens=chunk))
        results.append((terms.loss.detach(), torch.autograd.grad(terms.loss, h_s)[0]))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(grad, results[0][1])


def test_identical_models_have_zero_kd_loss():
    h_s, _, targets, head_s, _ = inputs(seed=2)
    terms = kd_loss(h_s, h_s.detach(), targets, head_s, head_s, KDLoss(chunk_tokens=16))
    assert abs(terms.kd.item()) < 1e-6
    assert terms.ce.item() > 1.0  # the student's own LM loss is still reported


def test_hidden_mse_adds_the_paired_layer_distance():
    h_s, h_t, targets, head_s, head_t = inputs(seed=3)
    tokens = torch.cat([targets[:1], targets]).view(1, TOKENS + 1)
    layer_s, layer_t = torch.randn(1, TOKENS + 1, WIDTH_S), torch.randn(1, TOKENS + 1, WIDTH_S)
    final_s, final_t = F.pad(h_s, (0, 0, 0, 1)).unsqueeze(0), F.pad(h_t, (0, 0, 0, 1)).unsqueeze(0)
    states_s, states_t = (None, layer_s, final_s), (None, layer_t, final_t)  # (embeddings, layer 0, final)
    plain = distill_loss(states_s, states_t, tokens, head_s, head_t, KDLoss(chunk_tokens=16))
    spec = KDLoss(chunk_tokens=16, hidden_mse=[(0, 0)], hidden_weight=0.5)
    with_mse = distill_loss(states_s, states_t, tokens, head_s, head_t, spec)
    want_mse = ((layer_s - layer_t) ** 2).mean()
    torch.testing.assert_close(with_mse.hidden, want_mse)
    torch.testing.assert_close(with_mse.loss, plain.loss + 0.5 * want_mse)


# ----------------------------------------------------------------------------- gjsd (TRL GKD's generalized JSD)
def _log_probs(seed: int, shape=(6, 11)):
    gen = torch.Generator().manual_seed(seed)
    return F.log_softmax(torch.randn(*shape, generator=gen, dtype=torch.float64) * 2, -1)


@pytest.mark.parametrize("beta, kind", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_gjsd_at_its_ends_is_forward_and_reverse_kl(beta, kind):
    h_s, h_t, targets, head_s, head_t = inputs(seed=4)
    for temperature in (1.0, 2.0):
        want = kd_loss(h_s, h_t, targets, head_s, head_t, KDLoss(kind=kind, temperature=temperature, chunk_tokens=16))
        spec = KDLoss(kind="gjsd", beta=beta, temperature=temperature, chunk_tokens=16)
        got = kd_loss(h_s, h_t, targets, head_s, head_t, spec)
        assert abs(got.loss.item() - want.loss.item()) < 1e-6


def test_gjsd_matches_its_definition_between_the_ends():
    student, teacher = _log_probs(0), _log_probs(1)
    p, q, beta = teacher.exp(), student.exp(), 0.3
    m = beta * p + (1 - beta) * q
    want = beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum()
    torch.testing.assert_close(divergence(student, teacher, "gjsd", beta), want)
    assert divergence(teacher, teacher, "gjsd", 0.5).abs() < 1e-12  # zero at agreement


def test_gjsd_gradient_is_correct_at_beta_one_half():
    teacher = _log_probs(1, (3, 5)).detach()
    logits = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: divergence(F.log_softmax(x, -1), teacher, "gjsd", 0.5), (logits,))


def test_gjsd_beta_outside_zero_one_is_refused():
    from pydantic import ValidationError

    for beta in (-0.1, 1.5):
        with pytest.raises(ValidationError, match="beta"):
            KDLoss(kind="gjsd", beta=beta)
