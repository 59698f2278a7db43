"""The house: one hook helper, one registry with one naming style, one list of public names,
the design document the code cites, a start-up that loads nothing heavy, and SmoothGrad."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import heatlens
from heatlens.engine.hooks import forward_hooks
from heatlens.methods.registry import (
    catalog,
    create_explainer,
    list_methods,
    method_class,
    method_options,
)

ROOT = Path(__file__).resolve().parent.parent


# --- one helper for every hook ------------------------------------------------------------------


def test_hooks_are_removed_when_the_pass_raises():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())

    def failing(module, args, output):
        raise RuntimeError("a hook that fails")

    with pytest.raises(RuntimeError, match="a hook that fails"), \
            forward_hooks([(model[0], failing)]):
        model(torch.zeros(1, 2))
    assert not model[0]._forward_hooks


def test_hooks_act_only_on_the_thread_that_set_them():
    model = nn.Linear(2, 2)
    seen: list[str] = []
    inside, done = threading.Event(), threading.Event()

    def other_thread():
        inside.wait()
        model(torch.zeros(1, 2))
        done.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with forward_hooks([(model, lambda *_: seen.append(threading.current_thread().name))]):
        inside.set()
        done.wait()
        model(torch.zeros(1, 2))
    worker.join()
    assert seen == [threading.current_thread().name]


# --- the registry ------------------------------------------------------------------------------


def test_method_names_follow_one_style():
    """Lower case, words joined by underscores (a hyphenated name such as Grad-CAM is one word)."""
    for name in list_methods():
        assert re.fullmatch(r"[a-z0-9+]+(_[a-z0-9+]+)*", name), name


@pytest.mark.parametrize(("old", "name"), [
    ("integratedgradients", "integrated_gradients"), ("inputxgradient", "input_x_gradient"),
    ("guidedbackprop", "guided_backprop"), ("guidedgradcam", "guided_gradcam"),
    ("gradcamelementwise", "gradcam_elementwise"), ("smoothgradcam++", "smooth_gradcam++"),
    ("attentionrollout", "attention_rollout"), ("gradientrollout", "gradient_rollout"),
    ("Grad-CAM++", "gradcam++"), ("rollout", "attention_rollout"), ("ig", "integrated_gradients"),
])
def test_earlier_names_still_name_their_method(old, name):
    assert method_class(old).name == name


def test_the_catalog_read_from_source_is_what_runs():
    """``heatlens methods`` lists methods from the source without importing them: each entry
    must be the class that registers itself when its module is imported."""
    for name, info in catalog().items():
        cls = method_class(name)
        assert (cls.name, tuple(cls.aliases)) == (info.name, info.aliases)
        assert (cls.__module__, cls.__name__) == (info.module, info.class_name)
        assert info.doc.split("\n\n")[0] in (cls.__doc__ or "").replace("\n    ", "\n")


def test_an_unknown_option_lists_the_methods_own(resnet18_seeded):
    with pytest.raises(TypeError, match=r"no option 'n_steps' \(it is called 'steps' here\); "
                                        r"its options are layer, steps, rule, baseline"):
        heatlens.explain(resnet18_seeded, torch.zeros(1, 3, 32, 32), "integrated_gradients",
                         n_steps=10)
    with pytest.raises(TypeError, match=r"no option 'fusio' \(did you mean 'fusion'\?\)"):
        create_explainer("gradcam", resnet18_seeded, fusio="mean")


BUDGETED = [name for name in list_methods() if "memory_budget" in method_options(
    method_class(name))]


def test_the_budgeted_methods_are_the_expected_ones():
    assert {"scorecam", "sscam", "iscam", "smooth_gradcam++", "ablationcam", "occlusion",
            "rise", "integrated_gradients", "smoothgrad"} <= set(BUDGETED)


@pytest.mark.parametrize("name", BUDGETED)
@pytest.mark.parametrize("budget", [0, -1, 1.5, "256MB", True])
def test_memory_budget_is_checked_when_the_method_is_made(resnet18_seeded, name, budget):
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
        create_explainer(name, resnet18_seeded, memory_budget=budget)


def test_noise_tunnel_checks_its_budget(resnet18_seeded):
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
        heatlens.NoiseTunnel(heatlens.GradCAM(resnet18_seeded), memory_budget=0)


# --- the public names --------------------------------------------------------------------------


def test_public_names_come_from_one_table_and_every_method_class():
    names = set(heatlens.__all__)
    assert {info.class_name for info in catalog().values()} <= names
    assert {"explain", "Explanation", "load_model", "ClassRegion", "factorize"} <= names
    for name in names:
        assert getattr(heatlens, name) is not None
    namespace: dict = {}
    exec("from heatlens import *", namespace)
    assert names <= set(namespace)
    with pytest.raises(AttributeError, match="no attribute 'GradCam'"):
        heatlens.GradCam  # noqa: B018


# --- the design document -----------------------------------------------------------------------


def test_every_promise_the_code_cites_is_in_docs_design():
    design = (ROOT / "docs" / "design.md").read_text()
    written = {int(n) for n in re.findall(r"^(\d+)\. \*\*", design, flags=re.MULTILINE)}
    cited: set[int] = set()
    for path in (ROOT / "heatlens").rglob("*.py"):
        for span in re.findall(r"design\.md``?,\s*(promises? [\d ,to-]+(?:and \d+)?)",
                               path.read_text()):
            numbers = [int(n) for n in re.findall(r"\d+", span)]
            if " to " in span:
                numbers = list(range(numbers[0], numbers[-1] + 1))
            cited.update(numbers)
    assert cited and cited <= written, cited - written
    assert "DESIGN" not in "".join(p.read_text() for p in (ROOT / "heatlens").rglob("*.py"))


# --- start-up ----------------------------------------------------------------------------------

HEAVY = ("torch", "torchvision", "matplotlib", "timm", "transformers")


def loaded_after(code: str) -> list[str]:
    """The heavy libraries a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    return eval(result.stdout.strip().splitlines()[-1])


def test_import_heatlens_loads_nothing_heavy():
    assert loaded_after("import heatlens") == []


@pytest.mark.parametrize("args", [["--help"], ["methods"], ["explain", "--help"]])
def test_the_command_answers_without_torch(args):
    code = ("from heatlens.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit:\n    pass")
    assert loaded_after(code) == []


# --- SmoothGrad, the name users type -----------------------------------------------------------


def test_smoothgrad_is_the_mean_saliency_over_seeded_noise(resnet18_seeded):
    """SmoothGrad (Smilkov et al., 2017, Eq. 2) written out: noise sample ``i`` drawn from its
    own generator, sigma = 0.15 times each image's range."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    samples, noise, seed = 4, 0.15, 5
    reach = (x.flatten(1).amax(1) - x.flatten(1).amin(1))[:, None, None, None]
    grads = []
    for i in range(samples):
        draw = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(
            seed * 1_000_003 + i))
        noisy = (x + noise * reach * draw).requires_grad_(True)
        out = resnet18_seeded(noisy)
        (g,) = torch.autograd.grad(out[[0, 1], [7, 9]].sum(), noisy)
        grads.append(g)
    expected = torch.stack(grads).mean(0)
    result = heatlens.explain(resnet18_seeded, x, "smoothgrad", target=[7, 9], samples=samples,
                              noise=noise, seed=seed)
    tunnel = heatlens.explain(resnet18_seeded, x, "saliency", target=[7, 9],
                              noise_tunnel="smoothgrad", nt_samples=samples, nt_seed=seed)
    assert result.method == "smoothgrad" and tunnel.method == "saliency+smoothgrad"
    torch.testing.assert_close(result.attributions, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.attributions, tunnel.attributions)


def test_no_public_name_is_hidden_by_a_subpackage():
    """Importing ``heatlens.x.y`` sets ``heatlens.x`` to the package ``x``: a public function
    of that name would be hidden once anything imported the package."""
    import importlib
    from pathlib import Path

    root = Path(heatlens.__file__).parent
    packages = {p.parent.name for p in root.glob("*/__init__.py")}
    assert not packages & set(heatlens.__all__)
    importlib.import_module("heatlens.shortcuts.clusters")
    assert callable(heatlens.audit)
