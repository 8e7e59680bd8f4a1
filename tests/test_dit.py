"""Specification of the DiT backbone (benchmark/backbones/dit.py)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from benchmark.backbones.dit import (
    DIT_SIZES,
    DiT,
    build_dit,
    scalar_features,
)
from benchmark.backbones.embed import sinusoidal

MODES = ("adaln", "in_context")
C, S, K = 2, 8, 10  # channels, image side, classes of the tiny test nets


def tiny(mode: str = "adaln", slots: tuple[str, ...] = ("t",), **kw) -> DiT:
    torch.manual_seed(0)
    options = dict(hidden=32, depth=3, heads=2, patch_size=2, label_tokens=2)
    return DiT(
        in_channels=C,
        image_size=S,
        num_classes=K,
        slots=slots,
        conditioning_mode=mode,
        **{**options, **kw},
    )


def perturb(net: DiT, std: float = 0.05) -> DiT:
    """Move every parameter off its (partly zero) init so the output is non-trivial."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


def inputs(
    batch: int, slots: tuple[str, ...], dtype: torch.dtype = torch.float32
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, C, S, S, generator=gen, dtype=dtype)
    cond = {s: torch.rand(batch, generator=gen, dtype=dtype) for s in slots}
    y = torch.randint(0, K + 1, (batch,), generator=gen)
    return x, cond, y


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- shapes and initialisation --------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "slots", [("t",), ("t", "r"), ("h", "omega", "t_min", "t_max"), ("t", "d")]
)
def test_output_shape_equals_input_shape(mode: str, slots: tuple[str, ...]) -> None:
    net = perturb(tiny(mode, slots))
    x, cond, y = inputs(3, slots)
    assert net(x, cond, y).shape == x.shape


@pytest.mark.parametrize("mode", MODES)
def test_output_is_exactly_zero_at_init_in_both_heads(mode: str) -> None:
    net = tiny(mode, ("t", "r"), aux_depth=1)
    x, cond, y = inputs(4, ("t", "r"))
    out, aux = net(x, cond, y, return_aux=True)
    assert out.abs().max().item() == 0.0
    assert aux.abs().max().item() == 0.0


def test_in_context_prefix_has_the_default_token_counts() -> None:
    net = tiny("in_context", ("h", "omega", "t_min", "t_max", "t"), label_tokens=8)
    counts = {k: v.shape[0] for k, v in net.prefix.tokens.items()}
    assert counts == {"h": 4, "omega": 4, "t_min": 2, "t_max": 2, "t": 4, "label": 8}
    assert net.num_prefix == 24


def test_scalar_features_equal_embed_sinusoidal_in_float32() -> None:
    s = torch.rand(5)
    for dim in (256, 7):
        torch.testing.assert_close(scalar_features(s, dim, torch.float32), sinusoidal(s, dim))


# -- forward-mode autodiff ------------------------------------------------------------------


def jvp_vs_central_differences(net: DiT, return_aux: bool) -> list[float]:
    """Relative errors of func.jvp in (x, t, r) against central differences, per output."""
    net = perturb(net.double())
    x, cond, y = inputs(2, ("t", "r"), torch.float64)
    gen = torch.Generator().manual_seed(3)
    vx = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    vt, vr = torch.ones(2, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)

    def f(x: Tensor, t: Tensor, r: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return net(x, {"t": t, "r": r}, y, return_aux=return_aux)

    _, tangent = torch.func.jvp(f, (x, cond["t"], cond["r"]), (vx, vt, vr))
    eps = 1e-5
    plus = f(x + eps * vx, cond["t"] + eps * vt, cond["r"] + eps * vr)
    minus = f(x - eps * vx, cond["t"] - eps * vt, cond["r"] - eps * vr)
    if not return_aux:
        tangent, plus, minus = (tangent,), (plus,), (minus,)
    return [
        rel_err(tan, (p - m) / (2 * eps)) for tan, p, m in zip(tangent, plus, minus, strict=True)
    ]


@pytest.mark.parametrize("mode", MODES)
def test_jvp_matches_central_finite_differences(mode: str) -> None:
    (err,) = jvp_vs_central_differences(tiny(mode, ("t", "r")), return_aux=False)
    assert err < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_jvp_through_aux_branch_matches_central_finite_differences(mode: str) -> None:
    errs = jvp_vs_central_differences(tiny(mode, ("t", "r"), aux_depth=1), return_aux=True)
    assert max(errs) < 1e-6


def test_sdpa_attention_matches_explicit_softmax() -> None:
    x, cond, y = inputs(3, ("t",))
    math_out = perturb(tiny("adaln")).eval()(x, cond, y)
    sdpa_out = perturb(tiny("adaln", attention="sdpa")).eval()(x, cond, y)
    torch.testing.assert_close(sdpa_out, math_out, atol=1e-5, rtol=1e-5)


# -- conditioning ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_changing_t_or_label_changes_the_output(mode: str) -> None:
    # larger weights than elsewhere: at std 0.05 the small embedder MLPs barely move c
    net = perturb(tiny(mode), std=0.2)
    x, cond, y = inputs(4, ("t",))
    out = net(x, cond, y)
    out_t = net(x, {"t": cond["t"] + 0.5}, y)
    out_y = net(x, cond, (y + 1) % (K + 1))
    scale = out.abs().mean().item()
    assert (out_t - out).abs().mean().item() > 1e-2 * scale
    assert (out_y - out).abs().mean().item() > 1e-2 * scale


@pytest.mark.parametrize("mode", MODES)
def test_wrong_cond_keys_raise_value_error_naming_the_expected_slots(mode: str) -> None:
    net = tiny(mode, ("t", "r"))
    x, cond, y = inputs(2, ("t", "r"))
    with pytest.raises(ValueError, match=r"\('t', 'r'\)"):
        net(x, {"t": cond["t"]}, y)
    with pytest.raises(ValueError, match=r"\('t', 'r'\)"):
        net(x, {**cond, "h": cond["t"]}, y)


@pytest.mark.parametrize("mode", MODES)
def test_each_sample_is_independent_of_the_rest_of_the_batch(mode: str) -> None:
    net = perturb(tiny(mode, ("t", "r")))
    x, cond, y = inputs(4, ("t", "r"))
    batched = net(x, cond, y)
    for i in range(4):
        alone = net(x[i : i + 1], {s: v[i : i + 1] for s, v in cond.items()}, y[i : i + 1])
        torch.testing.assert_close(alone, batched[i : i + 1], atol=1e-6, rtol=0)


# -- auxiliary head -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_aux_head_shares_the_trunk_and_owns_its_tail(mode: str) -> None:
    net = perturb(tiny(mode, aux_depth=2, depth=4))
    x, cond, y = inputs(3, ("t",))
    out, aux = net(x, cond, y, return_aux=True)
    assert out.shape == aux.shape == x.shape
    assert (out - aux).abs().max().item() > 1e-4
    torch.testing.assert_close(net(x, cond, y), out)
    assert len(net.blocks) == 2 and len(net.tail) == 2 and len(net.aux_tail) == 2
    main = {id(p) for m in (net.tail, net.final_layer) for p in m.parameters()}
    side = {id(p) for m in (net.aux_tail, net.aux_final_layer) for p in m.parameters()}
    assert not main & side
    # one trunk reached by both heads; each tail only by its own head
    trunk, aux_tail = list(net.blocks.parameters()), list(net.aux_tail.parameters())
    from_aux = torch.autograd.grad(aux.sum(), trunk, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in from_aux)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trunk)
    assert all(p.grad is None for p in aux_tail)


def test_return_aux_without_aux_depth_raises() -> None:
    net = tiny()
    x, cond, y = inputs(2, ("t",))
    with pytest.raises(ValueError, match="aux_depth"):
        net(x, cond, y, return_aux=True)


def test_aux_depth_must_leave_a_shared_trunk() -> None:
    with pytest.raises(ValueError, match="aux_depth=3"):
        tiny(depth=3, aux_depth=3)


# -- size registry --------------------------------------------------------------------------


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_dit_tiny_has_under_a_million_parameters() -> None:
    net = build_dit("dit-tiny", in_channels=1, image_size=8, num_classes=10, slots=("t",))
    assert 200_000 < n_params(net) < 700_000


def test_dit_b2_has_the_reference_130m_parameters() -> None:
    # on the meta device: real shapes, no memory, no init cost
    with torch.device("meta"):
        net = build_dit("dit-b", in_channels=4, image_size=32, num_classes=1000, slots=("t",))
    # DiT-B/2 reports 130.5M with learned sigma (twice the output channels) and the
    # 256 x 768 frozen positions stored as a parameter; ours has neither
    learned_sigma = 768 * 2 * 2 * 4 + 2 * 2 * 4
    positions = 256 * 768
    assert abs(n_params(net) + learned_sigma + positions - 130.5e6) < 0.1e6


def test_registry_has_the_paper_sizes_with_patch_2() -> None:
    paper = {"dit-s": (384, 12, 6), "dit-b": (768, 12, 12), "dit-l": (1024, 24, 16),
             "dit-xl": (1152, 28, 16)}  # fmt: skip
    for name, (hidden, depth, heads) in paper.items():
        assert DIT_SIZES[name] == dict(hidden=hidden, depth=depth, heads=heads, patch_size=2)


def test_unknown_size_or_option_raises_a_value_error_listing_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model size 'dit-q'.*dit-tiny"):
        build_dit("dit-q", in_channels=1, image_size=8, num_classes=10, slots=("t",))
    with pytest.raises(ValueError, match="unknown DiT option.*'depht'"):
        build_dit("dit-tiny", in_channels=1, image_size=8, num_classes=10, slots=("t",), depht=2)


def test_the_class_table_starts_at_the_configured_std_and_the_std_is_part_of_the_training_key() -> None:
    from benchmark.backbones import build_backbone
    from benchmark.config import compose_points
    from benchmark.plan import plan_points
    from benchmark.schema import ModelConfig

    torch.manual_seed(0)
    stds = {}
    for std in (1.0, 0.02):
        net = build_backbone(ModelConfig(label_init_std=std), shape=(1, 8, 8), num_classes=10, slots=("t",))
        stds[std] = net.cond_embed.labels.table.weight.std().item()  # 11 x 64 entries
    assert stds[1.0] == pytest.approx(1.0, rel=0.1) and stds[0.02] == pytest.approx(0.02, rel=0.1)
    assert ModelConfig().label_init_std == 1.0  # the suite's default (DiT's own is 0.02)
    keys = {plan_points(compose_points(["method=fm", f"model.label_init_std={s}"])).trainings[0].key
            for s in (1.0, 0.02)}
    assert len(keys) == 2
