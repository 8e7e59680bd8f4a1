"""Specification of the hand-written forward-mode passes ``DiT.jvp`` and ``MLPBackbone.jvp``.

Each is checked against ``torch.func.jvp`` of the backbone's own ``forward`` (float64,
weights moved off their partly-zero init): the same tangent, a primal that is the forward
output with the same parameter gradients, and a tangent that autograd never saw.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from benchmark.backbones.dit import DiT
from benchmark.backbones.mlp import MLPBackbone
from methods.jvp import backbone_jvp

SLOTS = ("t", "h")
K = 5  # classes; label K is the null label
BATCH = 3


def perturb(net: nn.Module, std: float = 0.1) -> nn.Module:
    """Move every parameter off its (partly zero) init so every path carries signal."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


def dit(mode: str, aux_depth: int = 0, attention: str = "math") -> nn.Module:
    torch.manual_seed(0)
    return DiT(
        in_channels=2, image_size=8, patch_size=2, hidden=32, depth=3, heads=2,
        num_classes=K, slots=SLOTS, conditioning_mode=mode, aux_depth=aux_depth,
        label_tokens=2, attention=attention,
    )  # fmt: skip


def mlp(aux_depth: int = 0) -> nn.Module:
    torch.manual_seed(0)
    return MLPBackbone(shape=(2,), num_classes=K, slots=SLOTS, width=16, depth=3, cond_dim=8,
                       aux_depth=aux_depth)  # fmt: skip


NETS: dict[str, Callable[[], nn.Module]] = {
    "dit-adaln": lambda: dit("adaln"),
    "dit-adaln-aux": lambda: dit("adaln", aux_depth=1),
    "dit-in_context": lambda: dit("in_context"),
    "dit-in_context-aux": lambda: dit("in_context", aux_depth=1),
    "mlp": lambda: mlp(),
    "mlp-aux": lambda: mlp(aux_depth=1),
}


def build(name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    return perturb(NETS[name]().to(dtype))


def has_aux(net: nn.Module) -> bool:
    return net.aux_depth > 0


def problem(
    net: nn.Module, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor, dict[str, Tensor]]:
    """(x, cond, y, x_tangent, cond_tangents) with random values for ``net``."""
    gen = torch.Generator().manual_seed(2)
    shape = (2, 8, 8) if isinstance(net, DiT) else (2,)
    x = torch.randn(BATCH, *shape, generator=gen, dtype=dtype)
    cond = {s: torch.rand(BATCH, generator=gen, dtype=dtype) for s in SLOTS}
    y = torch.randint(0, K + 1, (BATCH,), generator=gen)
    dx = torch.randn(x.shape, generator=gen, dtype=dtype)
    dcond = {s: torch.randn(BATCH, generator=gen, dtype=dtype) for s in SLOTS}
    return x, cond, y, dx, dcond


def as_tuple(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def func_jvp(
    net: nn.Module,
    x: Tensor,
    cond: dict[str, Tensor],
    y: Tensor,
    dx: Tensor,
    dcond: dict[str, Tensor],
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Reference: torch.func.jvp of ``forward`` in (x, cond), all outputs as tuples."""
    aux = has_aux(net)

    def f(x_: Tensor, *c: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return net(x_, dict(zip(SLOTS, c)), y, return_aux=aux)

    primal, tangent = torch.func.jvp(f, (x, *(cond[s] for s in SLOTS)),
                                     (dx, *(dcond[s] for s in SLOTS)))  # fmt: skip
    return as_tuple(primal), as_tuple(tangent)


def hand_jvp(
    net: nn.Module,
    x: Tensor,
    cond: dict[str, Tensor],
    y: Tensor,
    dx: Tensor,
    dcond: dict[str, Tensor],
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    primal, tangent = net.jvp(x, cond, y, dx, dcond, has_aux(net))
    return as_tuple(primal), as_tuple(tangent)


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- the tangent ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("direction", ["x_and_slots", "slots_only", "x_only", "t_only"])
def test_tangent_equals_torch_func_jvp(name: str, direction: str) -> None:
    net = build(name)
    x, cond, y, dx, dcond = problem(net)
    if direction in ("slots_only", "t_only"):
        dx = torch.zeros_like(dx)
    if direction == "x_only":
        dcond = {s: torch.zeros_like(v) for s, v in dcond.items()}
    if direction == "t_only":
        dcond = {"t": dcond["t"], "h": torch.zeros_like(dcond["h"])}
    _, expected = func_jvp(net, x, cond, y, dx, dcond)
    _, tangent = hand_jvp(net, x, cond, y, dx, dcond)
    for got, want in zip(tangent, expected, strict=True):
        assert want.norm() > 1e-3  # the direction really moves the output
        assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernels", "public-ops"])
@pytest.mark.parametrize("name", NETS)
def test_float32_tangent_agrees_with_torch_func_jvp(name: str, fused: bool, monkeypatch) -> None:
    """In float32, as training runs: the fused ATen backward kernels and their public-
    operator formulas each agree with ``torch.func.jvp`` to float32 rounding."""
    from benchmark.backbones import tangent

    monkeypatch.setattr(tangent, "FUSED", fused)
    net = build(name, torch.float32)
    x, cond, y, dx, dcond = problem(net, torch.float32)
    _, expected = func_jvp(net, x, cond, y, dx, dcond)
    _, got = hand_jvp(net, x, cond, y, dx, dcond)
    for g, want in zip(got, expected, strict=True):
        assert rel_err(g, want) < 2e-5


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_public_tangent_formulas_equal_the_fused_kernels(approximate: str, monkeypatch) -> None:
    from benchmark.backbones import tangent

    gen = torch.Generator().manual_seed(3)
    z, dz = (torch.randn(4, 7, generator=gen, dtype=torch.float64) * 3 for _ in range(2))
    weights = torch.softmax(torch.randn(2, 5, 5, generator=gen, dtype=torch.float64), -1)
    d_scores = torch.randn(2, 5, 5, generator=gen, dtype=torch.float64)
    fused = (tangent.gelu_tangent(z, dz, approximate), tangent.silu_tangent(z, dz),
             tangent.softmax_tangent(weights, d_scores))
    monkeypatch.setattr(tangent, "FUSED", False)
    public = (tangent.gelu_tangent(z, dz, approximate), tangent.silu_tangent(z, dz),
              tangent.softmax_tangent(weights, d_scores))
    for a, b in zip(fused, public):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["dit-adaln", "mlp"])
def test_a_slot_left_out_of_the_tangents_has_tangent_zero(name: str) -> None:
    net = build(name)
    x, cond, y, dx, dcond = problem(net)
    zero = torch.zeros_like(dcond["h"])
    _, expected = hand_jvp(net, x, cond, y, dx, {"t": dcond["t"], "h": zero})
    _, tangent = hand_jvp(net, x, cond, y, dx, {"t": dcond["t"]})
    torch.testing.assert_close(tangent, expected, rtol=1e-13, atol=1e-15)


def test_sdpa_attention_gets_the_tangent_of_the_explicit_softmax() -> None:
    # the fused kernel has no forward AD; the hand-written pass recomputes the weights
    math_net = perturb(dit("adaln").double())
    sdpa_net = perturb(dit("adaln", attention="sdpa").double())
    x, cond, y, dx, dcond = problem(math_net)
    _, expected = func_jvp(math_net, x, cond, y, dx, dcond)
    _, tangent = hand_jvp(sdpa_net, x, cond, y, dx, dcond)
    assert rel_err(tangent[0], expected[0]) < 1e-10


def test_tangent_matches_central_differences_in_float64() -> None:
    # an independent check, not sharing torch's forward-AD rules
    net = build("dit-in_context-aux")
    x, cond, y, dx, dcond = problem(net)
    _, tangent = hand_jvp(net, x, cond, y, dx, dcond)
    eps = 1e-6

    def f(sign: float) -> tuple[Tensor, ...]:
        moved = {s: cond[s] + sign * eps * dcond[s] for s in SLOTS}
        return net(x + sign * eps * dx, moved, y, return_aux=True)

    for got, plus, minus in zip(tangent, f(1.0), f(-1.0), strict=True):
        assert rel_err(got, (plus - minus) / (2 * eps)) < 1e-7


# -- the primal -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NETS)
def test_primal_is_forward_with_the_same_parameter_gradients(name: str) -> None:
    net = build(name)
    x, cond, y, dx, dcond = problem(net)
    params = list(net.parameters())
    plain = as_tuple(net(x, cond, y, return_aux=has_aux(net)))
    primal, _ = hand_jvp(net, x, cond, y, dx, dcond)
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in plain]

    def grads(outs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        functional = sum((w * o).sum() for w, o in zip(weights, outs, strict=True))
        return torch.autograd.grad(functional, params, allow_unused=True)

    torch.testing.assert_close(primal, plain, rtol=1e-12, atol=1e-14)
    for got, want in zip(grads(primal), grads(plain), strict=True):
        if want is None:
            assert got is None or got.abs().max() == 0
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["dit-adaln-aux", "dit-in_context-aux", "mlp-aux"])
def test_float32_primal_is_bitwise_the_forward_output(name: str) -> None:
    net = build(name, torch.float32)
    x, cond, y, dx, dcond = problem(net, torch.float32)
    primal, _ = hand_jvp(net, x, cond, y, dx, dcond)
    for got, want in zip(primal, net(x, cond, y, return_aux=True), strict=True):
        assert torch.equal(got, want)


# -- what autograd records ------------------------------------------------------------------


@pytest.mark.parametrize("name", NETS)
def test_tangent_is_not_recorded_by_autograd(name: str) -> None:
    net = build(name)
    x, cond, y, dx, dcond = problem(net)
    primal, tangent = hand_jvp(net, x, cond, y, dx, dcond)
    assert all(p.grad_fn is not None for p in primal)
    assert all(not t.requires_grad and t.grad_fn is None for t in tangent)


@pytest.mark.parametrize("name", ["dit-adaln-aux", "dit-in_context-aux", "mlp-aux"])
def test_nothing_is_recorded_when_grad_is_disabled(name: str) -> None:
    net = build(name)
    x, cond, y, dx, dcond = problem(net)
    with torch.no_grad():
        primal, tangent = hand_jvp(net, x, cond, y, dx, dcond)
    assert all(not t.requires_grad for t in (*primal, *tangent))


# -- through methods.jvp --------------------------------------------------------------------


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("primal_grad", [True, False])
def test_backbone_jvp_takes_the_hand_written_pass(
    name: str, primal_grad: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = build(name)
    x, cond, y, dx, dcond = problem(net)
    aux = has_aux(net)
    half = torch.full_like(dcond["h"], 0.5)  # backbone_jvp broadcasts a float tangent
    expected_primal, expected = func_jvp(net, x, cond, y, dx, {"t": dcond["t"], "h": half})

    def refuse(*args, **kwargs):
        raise AssertionError("torch.func.jvp called although the backbone has its own jvp")

    monkeypatch.setattr(torch.func, "jvp", refuse)
    primal, tangent = backbone_jvp(
        net, x, cond, y, dx, {"t": dcond["t"], "h": 0.5}, return_aux=aux, primal_grad=primal_grad
    )
    primal, tangent = as_tuple(primal), as_tuple(tangent)
    torch.testing.assert_close(primal, expected_primal, rtol=1e-12, atol=1e-14)
    for got, want in zip(tangent, expected, strict=True):
        assert rel_err(got, want) < 1e-10
    assert all((p.grad_fn is not None) == primal_grad for p in primal)


@pytest.mark.parametrize("name", ["dit-adaln", "mlp"])
def test_a_tangent_for_an_unknown_slot_raises_naming_it(name: str) -> None:
    net = build(name)
    x, cond, y, dx, dcond = problem(net)
    with pytest.raises(ValueError, match="'r'"):
        net.jvp(x, cond, y, dx, {**dcond, "r": dcond["t"]})
