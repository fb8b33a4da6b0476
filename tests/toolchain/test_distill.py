"""The distillation pieces the tunes share: the fused linear + KL, the calibration Gram matrix, AdamW."""

import pytest
import torch
from edgepack.toolchain import distill, linear_kl
from edgepack.toolchain.ressvd.calibration import gram_f64


def _composed(student, teacher, norm, head, positions, seed):
    return distill.sampled_kl(student, teacher, lambda h: head(norm(h)), positions, torch.Generator().manual_seed(seed))


def _fused(student, teacher, norm, head, positions, seed):
    return distill.sampled_kl_linear(student, teacher, norm, head, positions, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("positions", [None, 5])
def test_fused_kl_equals_the_composed_ops_in_value_and_gradient(bias, positions):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 70, bias=bias).requires_grad_(False)
    norm = torch.nn.LayerNorm(16)
    student = torch.randn(3, 11, 16, requires_grad=True)
    teacher = student.detach() + 0.5 * torch.randn(3, 11, 16)
    grads = []
    for loss_fn in (_composed, _fused):
        loss = loss_fn(student, teacher, norm, head, positions, 7)
        loss.backward()
        grads.append((loss.item(), student.grad.clone(), norm.weight.grad.clone()))
        student.grad, norm.weight.grad = None, None
    (a, ga, na), (b, gb, nb) = grads
    assert a > 0 and b == pytest.approx(a, rel=1e-5)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(nb, na, rtol=1e-4, atol=1e-7)  # the gradient goes on through the norm


def test_head_kl_takes_the_fused_path_only_for_a_frozen_linear_head(monkeypatch):
    torch.manual_seed(2)
    norm = torch.nn.LayerNorm(16)
    student, teacher = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    calls = []
    fused = distill.sampled_kl_linear
    monkeypatch.setattr(distill, "sampled_kl_linear", lambda *a, **k: calls.append(1) or fused(*a, **k))
    for trainable in (False, True):
        head = torch.nn.Linear(16, 70).requires_grad_(trainable)
        got = distill.head_kl(student, teacher, norm, head, 5, torch.Generator().manual_seed(3))
        assert float(got) == pytest.approx(float(_composed(student, teacher, norm, head, 5, 3)), rel=1e-5)
    assert calls == [1]  # the frozen head only


def test_fused_kl_over_several_blocks(monkeypatch):
    monkeypatch.setattr(linear_kl, "BLOCK_ROWS", 4)
    torch.manual_seed(1)
    weight = torch.randn(30, 8)
    student, teacher = torch.randn(10, 8, requires_grad=True), torch.randn(10, 8)
    fused = linear_kl.linear_kl(student, teacher, weight)
    fused.backward()
    grad, student.grad = student.grad.clone(), None
    log_q = torch.log_softmax(student @ weight.T, -1)
    log_p = torch.log_softmax(teacher @ weight.T, -1)
    reference = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    reference.backward()
    assert fused.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(grad, student.grad, rtol=1e-4, atol=1e-7)


def test_fused_kl_of_identical_states_is_zero_and_bfloat16_products_stay_close():
    torch.manual_seed(2)
    weight, states = torch.randn(50, 8), torch.randn(6, 8)
    assert float(linear_kl.linear_kl(states, states, weight)) == pytest.approx(0.0, abs=1e-6)
    other = states + 0.3 * torch.randn(6, 8)
    full = float(linear_kl.linear_kl(other, states, weight))
    half = float(linear_kl.linear_kl(other, states, weight, dtype=torch.bfloat16))
    assert half == pytest.approx(full, rel=0.05)


def test_fused_kl_refuses_a_trainable_head_and_mismatched_states():
    weight = torch.randn(20, 4, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        linear_kl.linear_kl(torch.randn(3, 4), torch.randn(3, 4), weight)
    with pytest.raises(ValueError, match="one shape"):
        linear_kl.linear_kl(torch.randn(3, 4), torch.randn(2, 4), weight.detach())


def test_only_a_plain_frozen_linear_head_takes_the_fused_path():
    head = torch.nn.Linear(4, 9)
    assert not distill.frozen_linear(head)  # trainable
    head.requires_grad_(False)
    assert distill.frozen_linear(head)

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    assert not distill.frozen_linear(Scaled(4, 9).requires_grad_(False))
    handle = head.register_forward_hook(lambda module, args, out: out + 1)
    assert not distill.frozen_linear(head)  # a hook changes what the head gives
    handle.remove()
    assert distill.frozen_linear(head)


@pytest.mark.parametrize("columns", [3, 200, 577])
def test_gram_from_its_upper_blocks_is_the_full_symmetric_product(columns):
    torch.manual_seed(3)
    x = torch.randn(5000, columns)
    gram = gram_f64(x, rows=1024)
    assert gram.dtype == torch.float64 and torch.equal(gram, gram.T)
    reference = x.double().T @ x.double()
    assert float((gram - reference).abs().max() / reference.abs().max()) < 1e-6


def test_adamw_uses_the_fused_kernel_and_matches_the_plain_update():
    torch.manual_seed(4)
    start = [torch.randn(7, 5), torch.randn(5)]
    grads = [torch.randn(7, 5), torch.randn(5)]
    fused = [p.clone().requires_grad_(True) for p in start]
    plain = [p.clone().requires_grad_(True) for p in start]
    optimizers = [distill._adamw(fused, 1e-2), torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.0)]
    assert optimizers[0].defaults["fused"]
    for _ in range(3):
        for params, optimizer in zip((fused, plain), optimizers):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b, before in zip(fused, plain, start):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, before)
