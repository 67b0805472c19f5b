"""MoE layer against a plain per-token reference: outputs, gradients, capacity drops, aux losses, stats."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from m6.config import ConfigError
from m6.model.dispatch import expert_mlp
from m6.model.moe import MoE, MoEConfig


def reference_moe(layer: MoE, x_TD: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Token-by-token MoE written from the definition, sharing only the weights with ``layer``.

    Routing: per prototype group, softmax over the group's experts, top-k; capacity
    assigned first-come in choice-major order (all first choices, then second, …).
    """
    cfg = layer.cfg
    G, Eg, k = cfg.num_prototypes, cfg.num_experts // cfg.num_prototypes, cfg.top_k
    W = layer.router.weight_ED
    w1, w2 = layer.experts.w1_EDF, layer.experts.w2_EFD
    T = x_TD.shape[0]
    choices = []  # per token: list of (expert, gate) in choice order
    for t in range(T):
        logits = x_TD[t] @ W.t()
        picks = []
        for g in range(G):
            p = logits[g * Eg:(g + 1) * Eg].softmax(-1)
            vals, idx = p.topk(k)
            picks += [(g * Eg + int(i), v) for v, i in zip(vals, idx)]
        # choice index c = g * k + j, matching the layer's [T, G*k] layout
        choices.append(picks)
    cap = layer.capacity(T)
    used = [0] * cfg.num_experts
    outs = [torch.zeros_like(x_TD[0]) for _ in range(T)]
    dropped = 0
    for c in range(G * k):
        for t in range(T):
            e, gate = choices[t][c]
            if cap is not None and used[e] >= cap:
                dropped += 1
                continue
            used[e] += 1
            outs[t] = outs[t] + gate * (F.gelu(x_TD[t] @ w1[e]) @ w2[e])
    return torch.stack(outs), dropped


CASES = {
    "top1": dict(num_experts=4, top_k=1),
    "top2": dict(num_experts=4, top_k=2),
    "k_top1": dict(num_experts=6, num_prototypes=3),
    "top1_cap": dict(num_experts=4, top_k=1, capacity_factor=0.75),
    "top2_cap": dict(num_experts=4, top_k=2, capacity_factor=0.8),
    "k_top1_cap": dict(num_experts=6, num_prototypes=2, capacity_factor=0.5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32_grouped_mm", "fp64_loop"])
@pytest.mark.parametrize("case", list(CASES))
def test_moe_matches_per_token_reference_in_outputs_and_gradients(case, dtype):
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=16, d_ff=24, aux_loss_coef=0.0, z_loss_coef=0.0, **CASES[case])).to(dtype)
    with torch.no_grad():
        layer.router.weight_ED.normal_(std=0.5)  # decisive routing: no near-ties between experts
    x = torch.randn(2, 19, 16, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 19, 16, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    layer.experts.method = "grouped" if dtype == torch.float32 else "loop"

    y, aux = layer(x)
    (y * g).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    gx = x.grad.clone()
    layer.zero_grad()
    x.grad = None

    y_ref, dropped = reference_moe(layer, x.reshape(-1, 16))
    (y_ref.view_as(g) * g).sum().backward()
    torch.testing.assert_close(y, y_ref.view_as(y), rtol=tol, atol=tol)
    torch.testing.assert_close(gx, x.grad, rtol=tol, atol=tol)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=tol, atol=tol, msg=f"grad of {n}")
    assert layer.last_stats["dropped"] == dropped
    assert float(aux) == 0.0
    if "cap" in case:
        assert dropped > 0, "the capacity case should exercise dropping"
    else:
        assert dropped == 0


def test_fp32_grouped_mm_and_loop_dispatch_agree_in_outputs_and_gradients_with_an_empty_expert():
    torch.manual_seed(1)
    counts = [20, 0, 17, 13]
    results = []
    for method in ("grouped", "loop"):
        x = torch.randn(50, 32, generator=torch.Generator().manual_seed(0)).requires_grad_()
        w1 = (torch.randn(4, 32, 48, generator=torch.Generator().manual_seed(1)) * 0.1).requires_grad_()
        w2 = (torch.randn(4, 48, 32, generator=torch.Generator().manual_seed(2)) * 0.1).requires_grad_()
        y = expert_mlp(x, w1, w2, counts, method=method)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view_as(y))
        results.append((y, x.grad, w1.grad, w2.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (results[0][2][1] == 0).all() and (results[0][3][1] == 0).all(), "an expert without rows gets zero grads"


def test_load_balancing_and_z_loss_match_hand_computed_values():
    # d_model = E = 2 and an identity router, so the logits are the inputs themselves.
    cfg = MoEConfig(d_model=2, d_ff=4, num_experts=2, aux_loss_coef=0.01, z_loss_coef=0.0)
    layer = MoE(cfg)
    with torch.no_grad():
        layer.router.weight_ED.copy_(torch.eye(2))
    x = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    _, aux = layer(x)
    # softmax rows: (.880797, .119203) ×2, (.119203, .880797), (.731059, .268941)
    # top-1 picks experts 0, 0, 1, 0 → f = (3/4, 1/4); P = mean rows = (.652964, .347036)
    # loss = α·N·Σ fᵢPᵢ = 0.01 · 2 · (0.75·0.652964 + 0.25·0.347036) = 0.01152964
    assert float(aux.detach()) == pytest.approx(0.01152964, abs=1e-7)

    layer.router.cfg = layer.cfg = MoEConfig(d_model=2, d_ff=4, num_experts=2, aux_loss_coef=0.0, z_loss_coef=0.001)
    _, aux = layer(x)
    # z = mean(logsumexp²) = (3·log(e²+1)² + log(e+1)²) / 4 = (3·4.523823 + 1.724657) / 4 = 3.824031
    assert float(aux.detach()) == pytest.approx(0.001 * 3.824031, abs=1e-8)


def test_uniform_router_gives_balancing_loss_equal_to_its_coefficient():
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=8, num_prototypes=2, aux_loss_coef=0.5, z_loss_coef=0.0)
    layer = MoE(cfg)
    with torch.no_grad():
        layer.router.weight_ED.zero_()
    _, aux = layer(torch.randn(64, 8))
    # all-equal probabilities: Σ fᵢ Pᵢ = 1/N whatever the tie-breaking, so the loss is exactly α
    assert float(aux.detach()) == pytest.approx(0.5, rel=1e-6)


def test_capacity_drops_are_counted_and_dropped_tokens_get_zero_output():
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=2, capacity_factor=0.5)
    layer = MoE(cfg)
    with torch.no_grad():
        layer.router.weight_ED.copy_(torch.tensor([[1.0] + [0.0] * 7, [-1.0] + [0.0] * 7]))
    x = torch.zeros(8, 8)
    x[:, 0] = 1.0  # every token prefers expert 0
    y, _ = layer(x)
    cap = layer.capacity(8)
    assert cap == 2
    st = layer.last_stats
    assert st["dropped"] == 6 and st["drop_rate"] == pytest.approx(6 / 8)
    assert st["tokens_per_expert"] == [8, 0]
    assert torch.count_nonzero(y.abs().sum(-1)) == 2
    assert (y[2:] == 0).all(), "tokens after the first `cap` lose the race in token order"


def test_stats_report_load_and_entropy():
    torch.manual_seed(3)
    layer = MoE(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2))
    layer(torch.randn(3, 10, 16))
    st = layer.last_stats
    assert sum(st["tokens_per_expert"]) == 60 and st["assignments"] == 60 and st["tokens"] == 30
    c = torch.tensor(st["tokens_per_expert"], dtype=torch.float64)
    assert st["load_cv"] == pytest.approx(float(c.std(unbiased=False) / c.mean()))
    assert 0.0 < st["router_entropy"] <= math.log(4) + 1e-6


def test_expert_parameters_are_marked_for_deepspeed_and_router_is_not():
    layer = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=2))
    for p in layer.experts.parameters():
        assert p.allreduce is False and p.group_name == "ep_size_1"
    assert not hasattr(layer.router.weight_ED, "allreduce")


def test_router_runs_in_fp32_under_bf16_inputs():
    torch.manual_seed(4)
    layer = MoE(MoEConfig(d_model=16, d_ff=16, num_experts=4))
    x = torch.randn(12, 16)
    r32 = layer.router(x)
    r16 = layer.to(torch.bfloat16).router(x.bfloat16())
    assert r16.weight_TK.dtype == torch.float32
    assert r16.aux_loss.dtype == torch.float32
    assert r32.expert_TK.shape == r16.expert_TK.shape == (12, 1)


def test_empty_input_and_bad_config_are_handled():
    layer = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=2))
    y, aux = layer(torch.zeros(0, 8))
    assert y.shape == (0, 8) and float(aux) == 0.0
    with pytest.raises(ConfigError, match="num_prototypes"):
        MoEConfig(d_model=8, d_ff=8, num_experts=6, num_prototypes=4)
