"""Losses against direct formulas: sampled softmax with accidental-hit masking, in-batch with logQ."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from modules.losses import in_batch_softmax_loss, log_sampling_probs, sampled_softmax_loss


def test_sampled_softmax_masks_accidental_hits():
    g = torch.Generator().manual_seed(0)
    q, pos = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    neg = torch.randn(5, 4, generator=g)
    pos_ids, neg_ids = torch.tensor([7, 2, 9]), torch.tensor([1, 7, 3, 4, 9])
    loss = sampled_softmax_loss(q, pos_ids, pos, neg_ids, neg, temperature=0.05)
    qn, pn, nn_ = F.normalize(q, dim=-1), F.normalize(pos, dim=-1), F.normalize(neg, dim=-1)
    expected = 0.0
    for i in range(3):
        logits = [float(qn[i] @ pn[i]) / 0.05] + [
            float(qn[i] @ nn_[r]) / 0.05 for r in range(5) if int(neg_ids[r]) != int(pos_ids[i])
        ]
        expected += math.log(sum(math.exp(x) for x in logits)) - logits[0]
    assert abs(float(loss) - expected / 3) < 1e-4


def test_sampled_softmax_per_position_negatives_and_weights():
    """[n, R] negatives (one set per position) and per-position weights, against the formula."""
    g = torch.Generator().manual_seed(3)
    q, pos = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    neg_ids = torch.tensor([[1, 2, 3], [2, 2, 6], [7, 3, 1], [4, 5, 6]])
    neg = torch.randn(4, 3, 5, generator=g)
    pos_ids, weights = torch.tensor([1, 2, 3, 4]), torch.tensor([1.0, 0.0, 2.0, 1.0])
    loss = sampled_softmax_loss(q, pos_ids, pos, neg_ids, neg, temperature=0.1, weights=weights)
    qn, pn, nn_ = F.normalize(q, dim=-1), F.normalize(pos, dim=-1), F.normalize(neg, dim=-1)
    expected = 0.0
    for i in range(4):
        logits = [float(qn[i] @ pn[i]) / 0.1] + [
            float(qn[i] @ nn_[i, r]) / 0.1 for r in range(3) if int(neg_ids[i, r]) != int(pos_ids[i])
        ]
        expected += float(weights[i]) * (math.log(sum(math.exp(x) for x in logits)) - logits[0])
    assert abs(float(loss) - expected / float(weights.sum())) < 1e-4


def test_log_sampling_probs_are_each_items_share_of_the_targets():
    log_q = log_sampling_probs(torch.tensor([0, 6, 3, 0, 1]))
    assert log_q[0] == float("-inf") and log_q[3] == float("-inf")
    torch.testing.assert_close(log_q[[1, 2, 4]].exp(), torch.tensor([0.6, 0.3, 0.1]))


def test_in_batch_logq_and_duplicate_masking():
    g = torch.Generator().manual_seed(1)
    q, p = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    ids = torch.tensor([5, 6, 5, 8])
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.5, 0.25]))
    loss = in_batch_softmax_loss(q, ids, p, temperature=0.1, log_q=log_q)
    qn, pn = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
    expected = 0.0
    for i in range(4):
        logits = {
            j: float(qn[i] @ pn[j]) / 0.1 - float(log_q[j])
            for j in range(4)
            if j == i or int(ids[j]) != int(ids[i])
        }
        expected += math.log(sum(math.exp(x) for x in logits.values())) - logits[i]
    assert abs(float(loss) - expected / 4) < 1e-4


def test_losses_keep_fp32_logits_under_bf16_autocast():
    """A confident model's gradient survives bf16 autocast: logits are not rounded to bf16's ~0.004 steps."""
    g = torch.Generator().manual_seed(2)
    p = F.normalize(torch.randn(16, 32, generator=g), dim=-1)
    q = (p + 0.3 * torch.randn(16, 32, generator=g)).requires_grad_()
    ids = torch.arange(1, 17)
    neg = torch.randn(8, 32, generator=g)
    neg_ids = torch.arange(100, 108)
    cases = {
        "in_batch": lambda: in_batch_softmax_loss(q, ids, p, temperature=0.05, log_q=torch.zeros(16)),
        "sampled": lambda: sampled_softmax_loss(q, ids, p, neg_ids, neg, temperature=0.05),
    }
    for name, loss_fn in cases.items():
        (ref_grad,) = torch.autograd.grad(loss_fn(), q)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn()
        (grad,) = torch.autograd.grad(loss, q)
        assert loss.dtype == torch.float32, name
        assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7), name
