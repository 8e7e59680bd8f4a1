"""The plug-in contract, checked for every registered method on both backbones.  The methods
are the registry's (``METHOD_NAMES``, discovered from methods/specs/), never a hand list, so
a new method is covered by adding its two files (docs/adding-a-method.md)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmark.backbones.dit import build_dit
from benchmark.backbones.mlp import MLPBackbone
from benchmark.config import CONFIG_DIR, method_yaml
from benchmark.sample import generate
from methods import METHOD_NAMES, get_method, get_spec
from methods.base import Batch, Method
from methods.specs import InvalidPoint, step_cost_baseline

NUM_CLASSES = 3


def build(name: str, backbone: str):
    spec = get_spec(name)
    cfg = spec.Config()
    method = get_method(name)(cfg, NUM_CLASSES)
    options = method.backbone_options()
    torch.manual_seed(0)
    if backbone == "mlp":
        options = {k: v for k, v in options.items() if k != "conditioning_mode"}
        net, shape = MLPBackbone(shape=(2,), num_classes=NUM_CLASSES, slots=method.conditioning,
                                 width=32, depth=3, **options), (2,)
    else:
        options.setdefault("aux_depth", 0)
        options["aux_depth"] = min(options["aux_depth"], 1)
        net, shape = build_dit("dit-tiny", in_channels=1, image_size=8, num_classes=NUM_CLASSES,
                               slots=method.conditioning, **options), (1, 8, 8)
    for p in net.parameters():  # away from the zero init so every path carries signal
        p.data.add_(0.02 * torch.randn_like(p))
    return spec, cfg, method, net, shape


def legal_nfes(spec, cfg) -> list[int]:
    allowed = spec.allowed_nfe(cfg)
    return [n for n in (1, 2, 4) if allowed is None or n in allowed]


def guidances(spec) -> list[float]:
    return [1.0] if spec.guidance in ("none", "train") else [1.0, 2.5]


@pytest.mark.parametrize("backbone", ["mlp", "dit"])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_loss_and_gradients_are_finite(name: str, backbone: str) -> None:
    spec, cfg, method, net, shape = build(name, backbone)
    x = torch.randn(16, *shape)
    y = torch.randint(0, NUM_CLASSES, (16,))
    loss, logs = method.loss(net, Batch(x, y), step=5, generator=torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) for v in logs.values())
    loss.backward()
    grads = [p.grad for p in [*net.parameters(), *method.parameters()] if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("backbone", ["mlp", "dit"])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_samples_have_the_noise_shape_and_counted_passes_equal_declared_cost(name: str, backbone: str) -> None:
    spec, cfg, method, net, shape = build(name, backbone)
    _, evals = cfg.split()
    labels = torch.arange(6) % NUM_CLASSES
    for nfe in legal_nfes(spec, cfg):
        for guidance in guidances(spec):
            spec.validate(cfg, nfe, guidance)
            out = generate(method, net, shape=shape, labels=labels, nfe=nfe, guidance=guidance,
                           seed=3, batch_size=4, eval_params=evals)
            assert out.samples.shape == (6, *shape)
            assert torch.isfinite(out.samples).all()
            assert out.nfe_counted == spec.nfe_cost(cfg, nfe, guidance), (nfe, guidance)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_same_seed_gives_the_same_samples(name: str) -> None:
    spec, cfg, method, net, shape = build(name, "mlp")
    _, evals = cfg.split()
    labels = torch.arange(5) % NUM_CLASSES
    nfe = legal_nfes(spec, cfg)[-1]
    a = generate(method, net, shape=shape, labels=labels, nfe=nfe, guidance=1.0, seed=11, batch_size=5,
                 eval_params=evals)
    torch.manual_seed(123)  # global RNG state must not matter
    b = generate(method, net, shape=shape, labels=labels, nfe=nfe, guidance=1.0, seed=11, batch_size=5,
                 eval_params=evals)
    assert torch.equal(a.samples, b.samples)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_illegal_evaluation_points_are_rejected_with_the_allowed_values(name: str) -> None:
    spec = get_spec(name)
    cfg = spec.Config()
    with pytest.raises(InvalidPoint, match="nfe"):
        spec.validate(cfg, 0, 1.0)
    allowed = spec.allowed_nfe(cfg)
    if allowed is not None:
        bad = next(n for n in range(1, 1000) if n not in allowed)
        with pytest.raises(InvalidPoint, match="allowed: nfe=" + ",".join(map(str, allowed))):
            spec.validate(cfg, bad, 1.0)
    if spec.guidance == "none":
        with pytest.raises(InvalidPoint, match="guidance"):
            spec.validate(cfg, 1, 2.0)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_yaml_lists_every_config_field_with_its_default(name: str) -> None:
    path = CONFIG_DIR / "method" / f"{name}.yaml"
    assert path.read_text() == method_yaml(name), "run `python -m benchmark.config` to regenerate"


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_config_field_declares_its_axis(name: str) -> None:
    spec = get_spec(name)
    for f in dataclasses.fields(spec.Config):
        assert f.metadata.get("axis") in ("train", "eval"), f.name
        assert f.metadata.get("help"), f.name
    assert isinstance(spec.version, int)


def test_the_registry_is_every_spec_module_in_table_order() -> None:
    import pkgutil

    import methods.specs

    modules = {m.name for m in pkgutil.iter_modules(methods.specs.__path__)} - {"base", "meanflow_family"}
    assert set(METHOD_NAMES) == modules
    orders = [get_spec(name).order for name in METHOD_NAMES]
    assert orders == sorted(orders)
    assert METHOD_NAMES[:5] == ("fm", "meanflow", "imf", "shortcut", "scm")  # the tables' order
    assert step_cost_baseline() == "fm"


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_implementation_is_the_method_class_of_the_same_spec(name: str) -> None:
    spec = get_spec(name)
    cls = get_method(name)
    assert issubclass(cls, Method) and cls.__module__.startswith("methods.")
    assert type(cls.spec) is type(spec) and spec.name == name
    assert f"methods/specs/{name}.py" in method_yaml(name)


def test_a_spec_naming_a_class_outside_the_methods_package_is_refused(tmp_path, monkeypatch) -> None:
    import sys

    import methods.specs as registry

    module = tmp_path / "evil.py"
    module.write_text("from methods.specs.fm import FlowMatchingSpec\n"
                      "class EvilSpec(FlowMatchingSpec):\n"
                      "    name = 'evil'\n"
                      "    implementation = 'os:system'\n")
    monkeypatch.setattr(registry, "__path__", [*registry.__path__, str(tmp_path)])
    try:
        with pytest.raises(TypeError, match="inside the methods package"):
            registry._declared_spec("evil")
    finally:
        sys.modules.pop("methods.specs.evil", None)
