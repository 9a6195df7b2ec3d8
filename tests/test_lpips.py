"""LPIPS (crrf_jax/models/lpips.py) against the official `lpips` package (0.1.4) with random weights, the
weights converter (crrf_jax/tools/lpips_weights.py), the loader's errors, and EMRDM's CUHK-CR scorer with
LPIPS (crrf_jax/rgb_metrics.py) against EMRDM's evaluator re-run with scikit-image and lpips.

`lpips` imports torchvision only for `torchvision.models.alexnet(pretrained=...).features`. PyPI's torchvision
wheels are CUDA builds that do not load beside the CPU torch wheel, so where torchvision is missing the test
hands `lpips` a stand-in module whose `alexnet` builds torchvision's AlexNet `features` layout (the same
layers, in the same order, hence the same state-dict names) with torch's default initialisation; everything
else (scaling layer, normalisation, heads, averaging) is the package's own code. Nothing is downloaded:
`pretrained=False, pnet_rand=True` loads no weights.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("lpips") is None:  # imported in `lpips_pkg`, with torchvision or the stand-in
    pytest.skip("the lpips package is not installed (pip install lpips)", allow_module_level=True)

from crrf_jax import rgb_metrics as RM
from crrf_jax.models import lpips as L

SIZE = 64  # AlexNet's feature maps: 15, 7, 3, 3, 3 pixels


def _torchvision_standin() -> types.ModuleType:
    nn = torch.nn

    class AlexNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            )

    def alexnet(pretrained=False, **_):
        assert not pretrained, "the test never loads pretrained torchvision weights"
        return AlexNet()

    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    tv.models.alexnet = alexnet
    return tv


@pytest.fixture(scope="module")
def lpips_pkg():
    """The `lpips` package, imported with torchvision or, where that is missing, the stand-in (removed from
    sys.modules right after, so no other test sees it)."""
    try:
        importlib.import_module("torchvision.models")
    except (ImportError, RuntimeError, OSError):  # missing, or a CUDA build that fails to load
        torchvision_loads = False
    else:
        torchvision_loads = True
    if torchvision_loads:
        return importlib.import_module("lpips")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "torchvision" or k.startswith("torchvision.")}
    standin = _torchvision_standin()
    sys.modules.update({"torchvision": standin, "torchvision.models": standin.models})
    try:
        for name in [k for k in sys.modules if k == "lpips" or k.startswith("lpips.")]:
            del sys.modules[name]
        return importlib.import_module("lpips")
    finally:
        for name in ("torchvision", "torchvision.models"):
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def _reference(lpips_pkg, version="0.1"):
    """A randomly initialised official LPIPS-alex (heads made non-negative, as trained ones are)."""
    torch.manual_seed(0)
    ref = lpips_pkg.LPIPS(net="alex", version=version, pretrained=False, pnet_rand=True, verbose=False)
    with torch.no_grad():
        for lin in ref.lins:
            lin.model[1].weight.abs_()
    return ref.eval()


def _save(ref, path) -> str:
    from safetensors.torch import save_file

    # The package's state dict names each head twice (lin{k} and the ModuleList alias lins.{k}): keep lin{k}.
    save_file({k: v.contiguous() for k, v in ref.state_dict().items() if not k.startswith("lins.")}, str(path))
    return str(path)


def _torch_distance(ref, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        d = ref(torch.from_numpy(x0).permute(0, 3, 1, 2), torch.from_numpy(x1).permute(0, 3, 1, 2))
    return d.reshape(-1).numpy()


def _pair(seed: int, low: float, high: float, batch: int = 3):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(low, high, (batch, SIZE, SIZE, 3)).astype(np.float32)
    x1 = np.clip(x0 + 0.2 * (high - low) * rng.standard_normal(x0.shape), low, high).astype(np.float32)
    return x0, x1


@pytest.mark.parametrize("version", ["0.1", 0.1])  # 0.1 (a float, as EMRDM passes it): no scaling layer
def test_matches_the_lpips_package(lpips_pkg, tmp_path, version):
    ref = _reference(lpips_pkg, version)
    model = L.load_lpips(_save(ref, tmp_path / "alex.safetensors"), scale_inputs=version == "0.1")
    low, high = (-1.0, 1.0) if version == "0.1" else (0.0, 255.0)  # EMRDM feeds 0..255 to the unscaled one
    x0, x1 = _pair(1, low, high)
    expected = _torch_distance(ref, x0, x1)
    got = np.asarray(model(x0, x1))
    assert got.shape == (3,) and np.all(expected > 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model(x0, x0)), 0.0, atol=1e-7)


def test_converter_from_torchvision_and_package_files(lpips_pkg, tmp_path):
    from crrf_jax.tools import lpips_weights

    ref = _reference(lpips_pkg)
    state = ref.state_dict()
    # torchvision's AlexNet file (features.i.* and a classifier) and the package's heads file, as torch.save'd.
    trunk = {"features." + k.split(".", 2)[2]: v for k, v in state.items() if k.startswith("net.")}
    trunk["classifier.1.weight"] = torch.zeros(8, 16)  # dropped by the converter (4096 x 9216 in the real file)
    torch.save(trunk, tmp_path / "alexnet.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, tmp_path / "alex.pth")
    out = tmp_path / "lpips_alex.safetensors"
    lpips_weights.main(["--alexnet", str(tmp_path / "alexnet.pth"), "--lin", str(tmp_path / "alex.pth"),
                        "--out", str(out)])
    x0, x1 = _pair(2, -1.0, 1.0, batch=2)
    np.testing.assert_allclose(np.asarray(L.load_lpips(out)(x0, x1)), _torch_distance(ref, x0, x1),
                               rtol=1e-5, atol=1e-5)


def test_loader_errors_name_the_file_and_key(lpips_pkg, tmp_path):
    from safetensors.numpy import save_file

    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors.*crrf_jax\.tools\.lpips_weights"):
        L.load_lpips(tmp_path / "missing.safetensors")
    good = {k: v.numpy() for k, v in _reference(lpips_pkg).state_dict().items() if not k.startswith("lins.")}
    cases = {
        "no_head": ({k: v for k, v in good.items() if k != "lin3.model.1.weight"}, r"missing key 'lin3"),
        "bad_shape": (good | {"net.slice2.3.weight": np.zeros((192, 64, 3, 3), np.float32)},
                      r"'net\.slice2\.3\.weight' has shape \(192, 64, 3, 3\), expected \(192, 64, 5, 5\)"),
        "extra": (good | {"net.slice6.12.weight": np.zeros(3, np.float32)}, r"unexpected keys \['net\.slice6"),
        "shift": (good | {"scaling_layer.shift": np.zeros((1, 3, 1, 1), np.float32)}, r"'scaling_layer\.shift'"),
    }
    for name, (state, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path))
        with pytest.raises((KeyError, ValueError), match=rf"{name}\.safetensors.*{message}"):
            L.load_lpips(path)


def _emrdm_evaluator(lpips_pkg, ref, target: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """EMRDM's sgm/modules/learning/evaluator.py::img_metrics on one (H, W, C) pair, restated with torch,
    scikit-image and lpips (its 4-channel branch with the image's own size instead of a fixed 256)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    def to8(x):
        x = torch.from_numpy(x).permute(2, 0, 1) * 2 - 1
        return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)

    def ssim(a, b):  # a, b (3, H, W) uint8 tensors
        grey = [np.tensordot(x.numpy().transpose(1, 2, 0), list(RM.LUMA), axes=1) for x in (a, b)]
        return structural_similarity(grey[0], grey[1], data_range=255)

    def lp(a, b):
        with torch.no_grad():
            return ref.forward(a.float()[None], b.float()[None]).item()

    a, b = to8(pred), to8(target)
    psnr = peak_signal_noise_ratio(a.numpy().transpose(1, 2, 0), b.numpy().transpose(1, 2, 0), data_range=255)
    if a.shape[0] == 3:
        return {"psnr_255": psnr, "ssim_255": ssim(a, b), "lpips": lp(a, b)}
    pairs = [(a[i].expand(3, *a.shape[1:]), b[i].expand(3, *b.shape[1:])) for i in range(a.shape[0])]
    return {"psnr_255": psnr, "ssim_255": np.mean([ssim(*p) for p in pairs]),
            "lpips": np.mean([lp(*p) for p in pairs])}


@pytest.mark.parametrize("bands", [("B04", "B03", "B02", "B08"), ("B02", "B03", "B04")])
def test_scorer_matches_emrdm_evaluator(lpips_pkg, tmp_path, bands):
    ref = _reference(lpips_pkg, version=0.1)  # EMRDM: lpips.LPIPS(net='alex', version=0.1)
    scorer = RM.RGB255Scorer(bands, _save(ref, tmp_path / "alex.safetensors"))
    rng = np.random.default_rng(3)
    target = rng.random((2, SIZE, SIZE, len(bands)), dtype=np.float32)
    pred = (target + 0.1 * rng.standard_normal(target.shape)).astype(np.float32)  # unclipped, as EMRDM's
    got = scorer({"model": pred}, target)["model"]
    assert scorer.bands == ["B04", "B03", "B02", "B08"][: len(bands)] and set(got) == set(scorer.metric_names)
    order = list(scorer.channels)
    for i in range(2):
        expected = _emrdm_evaluator(lpips_pkg, ref, target[i][..., order], pred[i][..., order])
        for name, value in expected.items():
            np.testing.assert_allclose(got[name][i], value, rtol=1e-5, atol=1e-5, err_msg=f"{bands} {name}")


def test_sen2mtc_scorer_matches_emrdm_metrics(lpips_pkg, tmp_path):
    from tests.helpers import emrdm_sen2mtc as EMRDM  # the reference, re-typed from EMRDM's source

    ref = _reference(lpips_pkg)  # EMRDM's metrics.py: lpips.LPIPS(net='alex'), version '0.1' (scaling layer)
    bands = ("B04", "B03", "B02", "B08")
    scorer = RM.Sen2MTCScorer(bands, _save(ref, tmp_path / "alex.safetensors"))
    rng = np.random.default_rng(4)
    target = (rng.integers(0, 2600, (2, SIZE, SIZE, 4)) / np.float32(10000)).astype(np.float32)
    pred = (target + 0.03 * rng.standard_normal(target.shape)).astype(np.float32)  # unclipped, as EMRDM's
    got = scorer({"model": pred}, target)["model"]
    assert scorer.bands == ["B04", "B03", "B02"] and set(got) == set(scorer.metric_names)
    assert "lpips_mtc" in got
    names = {"psnr": "PSNR", "ssim": "SSIM", "sam": "SAM", "mae": "MAE", "rmse": "RMSE", "lpips": "LPIPS"}
    for i in range(2):
        expected = EMRDM.score(target[i][..., :3], pred[i][..., :3], ref)
        assert expected["LPIPS"] > 0
        for name, key in names.items():
            np.testing.assert_allclose(got[f"{name}_mtc"][i], expected[key], rtol=1e-5, atol=1e-5, err_msg=name)
