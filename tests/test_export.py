"""Bundle export: workdir -> bundle -> CloudRemover gives the workdir's predictions, on 1 and 8 devices.

The fake workdir is what train.py leaves behind: `save_run_config`, each stage's EMA weights written by
rundir.save_final itself, and latent statistics. Weights are random (the tiny variant, drawn with NumPy: eager
initialisation of the networks takes far longer on CPU than the test).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from crrf_jax import bundle as bundle_lib
from crrf_jax import export, rundir
from crrf_jax.inference import CloudRemover
from tests.helpers import CHEAP_XLA_FLAGS, with_devices

ROOT = Path(__file__).resolve().parents[1]
LATENT_STATS = {
    "vae_s2": {"scale_factor": 0.8, "shift_factor": 0.05, "values": 1000},
    "vae_s1": {"scale_factor": 1.3, "shift_factor": -0.1, "values": 1000},
}
# Shared by the inference and prediction tests: one tile shape and sampling setting compile once per session.
TILE, OVERLAP, STEPS = 64, 16, 2

_CACHE: dict[str, Path] = {}


def random_state(abstract_model, seed: int) -> dict[str, np.ndarray]:
    """Random weights of sensible scale for each state leaf of `abstract_model` (from abstract_network)."""
    from flax import nnx

    rng = np.random.default_rng(seed)
    _, state = nnx.split(abstract_model)
    out = {}
    for path, leaf in bundle_lib._walk(nnx.to_pure_dict(state)):
        name, shape = str(path[-1]), tuple(leaf.shape)
        if name == "scale_factor":
            value = np.ones(shape)
        elif name == "shift_factor":
            value = np.zeros(shape)
        elif name == "kernel":  # fan-in scaling; stacked (layers, in, out) kernels count `in` only
            fan_in = shape[-2] if len(shape) == 3 else int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.05 * rng.standard_normal(shape)
        out["/".join(map(str, path))] = value.astype(leaf.dtype)
    return out


def make_fake_workdir(workdir: Path, seed: int = 0, config=None) -> Path:
    """A finished tiny training run (configs/demo.py, or `config`) with random weights, as train.py writes it."""
    import optax

    from configs import demo
    from crrf_jax import train_lib

    config = demo.get_config() if config is None else config
    rundir.save_run_config(config, workdir)
    cfg = bundle_lib.bundle_config(config)
    for i, stage in enumerate(bundle_lib.NETWORKS):
        if stage not in bundle_lib.networks(cfg):
            continue
        abstract = bundle_lib.abstract_network(cfg, stage)
        model = bundle_lib.fill_state(abstract, random_state(abstract, seed + i), "random weights")
        rundir.save_final(str(workdir / stage), train_lib.create_train_state(model, optax.sgd(0.0)))
    (workdir / "latent_stats").mkdir(parents=True, exist_ok=True)
    stats = {k: v for k, v in LATENT_STATS.items() if k in bundle_lib.networks(cfg)}
    (workdir / "latent_stats" / "latent_stats.json").write_text(json.dumps(stats))
    return workdir


def fake_run(tmp_path_factory) -> tuple[Path, Path]:
    """(workdir, bundle) made once per session."""
    if "workdir" not in _CACHE:
        root = tmp_path_factory.mktemp("fake_run")
        _CACHE["workdir"] = make_fake_workdir(root / "workdir")
        _CACHE["bundle"] = export.export_bundle(_CACHE["workdir"], root / "bundle")
    return _CACHE["workdir"], _CACHE["bundle"]


def random_scene(height: int = 100, width: int = 120, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "s2_cloudy": rng.uniform(0.0, 0.6, (height, width, 13)).astype(np.float32),
        "s1": rng.uniform(0.0, 1.0, (height, width, 2)).astype(np.float32),
        "cloud_prob": rng.uniform(0.0, 1.0, (height, width, 1)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fake_run(tmp_path_factory)


def _predict(remover: CloudRemover, scene: dict, **kw) -> tuple[np.ndarray, np.ndarray]:
    return remover.remove_clouds(scene["s2_cloudy"], scene["s1"], scene["cloud_prob"], steps=STEPS,
                                 tile_size=TILE, overlap=OVERLAP, **kw)


def test_bundle_contents(run):
    _, bundle = run
    names = sorted(p.name for p in bundle.iterdir())
    assert names == sorted(["README.txt", "config.json", "latent_stats.json",
                            *bundle_lib.WEIGHT_FILES.values()])
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["model"]["variant"] == "tiny" and cfg["model"]["flux"]["hidden_size"] == 64
    assert cfg["bands"]["names"][8] == "B8A" and len(cfg["bands"]["indices"]) == 13
    from configs import demo

    flow = demo.get_config().flow
    assert cfg["sampling"] == {"steps": flow.sample_steps, "guidance_scale": flow.guidance_scale,
                               "source": flow.source, "source_sigma": flow.source_sigma,
                               "shift_schedule": flow.shift_schedule}
    assert cfg["weights"]["refiner"] == "refiner.safetensors" and cfg["model"]["refiner"]["enabled"]
    assert cfg["tiling"]["tile_size"] == 64
    stats = json.loads((bundle / "latent_stats.json").read_text())
    assert stats["vae_s1"] == {"scale_factor": 1.3, "shift_factor": -0.1}
    from safetensors.numpy import load_file

    cnn = load_file(str(bundle / "cloud_cnn.safetensors"))
    transformer = load_file(str(bundle / "transformer.safetensors"))
    assert cnn and all(k.startswith("cloud_encoder/") for k in cnn)
    assert not any(k.startswith("cloud_encoder/") for k in transformer) and "null_sar" in transformer
    vae_s1 = load_file(str(bundle / "vae_s1.safetensors"))  # the measured statistics, not the stage's 1 / 0
    assert float(vae_s1["scale_factor"].item()) == pytest.approx(1.3)
    assert "--bundle" in (bundle / "README.txt").read_text()


def test_bundle_matches_workdir(run):
    workdir, bundle = run
    from_workdir, from_bundle = CloudRemover.from_workdir(workdir), CloudRemover.from_bundle(bundle)
    for name in ("vae_s2", "vae_s1"):
        vae = getattr(from_bundle.nets, "s2_state" if name == "vae_s2" else "s1_state")
        assert float(vae["scale_factor"][...]) == pytest.approx(LATENT_STATS[name]["scale_factor"])
    scene = random_scene()
    clear_w, std_w = _predict(from_workdir, scene, num_samples=2, seed=3)
    clear_b, std_b = _predict(from_bundle, scene, num_samples=2, seed=3)
    np.testing.assert_array_equal(clear_w, clear_b)
    np.testing.assert_array_equal(std_w, std_b)
    assert clear_w.shape == (100, 120, 13) and std_w.min() >= 0 and std_w.max() > 0
    other, _ = _predict(from_bundle, scene, num_samples=2, seed=4)
    assert np.abs(other - clear_b).max() > 1e-3  # the seed matters: the comparison above is not vacuous


def test_outputs_of_the_refined_model(run):
    """The final output is the refined flow sample; "flow" skips the refiner, "roundtrip_refined" refines
    the cloudy image's VAE round trip (deterministic); keep_clear returns clear pixels as they came."""
    _, bundle = run
    remover = CloudRemover.from_bundle(bundle)
    assert remover.has_refiner
    scene = random_scene(64, 64, seed=5)
    tiles = {k: v[None] for k, v in scene.items()}
    ids = np.zeros(1, np.int32)
    out = {name: remover.predict_tiles(tiles, ids, steps=STEPS, output=name)[0]
           for name in ("final", "flow", "roundtrip_refined")}
    assert np.abs(out["final"] - out["flow"]).max() > 1e-3
    assert np.abs(out["final"] - out["roundtrip_refined"]).max() > 1e-3
    again = remover.predict_tiles(tiles, ids, steps=STEPS, seed=9, output="roundtrip_refined")[0]
    np.testing.assert_array_equal(again, out["roundtrip_refined"])  # no noise in that path
    kept, std = remover.predict_tiles(tiles, ids, steps=STEPS, keep_clear=0.3)
    clear = tiles["cloud_prob"][..., 0] < 0.3
    np.testing.assert_array_equal(kept[clear], tiles["s2_cloudy"][clear])
    np.testing.assert_array_equal(kept[~clear], out["final"][~clear])
    assert np.all(std[clear] == 0)
    full, _ = _predict(remover, scene, keep_clear=0.3)  # the scene path: exact after blending too
    np.testing.assert_array_equal(full[clear[0]], scene["s2_cloudy"][clear[0]])


def test_bundle_without_refiner(tmp_path):
    """A model trained without the refiner exports and predicts without one (no refiner file)."""
    from configs import demo

    config = demo.get_config()
    config.model.refiner.enabled = False
    cfg = bundle_lib.bundle_config(config)
    assert bundle_lib.networks(cfg) == ("vae_s2", "vae_s1", "flow") and "refiner" not in cfg["weights"]
    states = {}
    for i, name in enumerate(bundle_lib.networks(cfg)):
        states[name] = random_state(bundle_lib.abstract_network(cfg, name), i)
    stats = {k: {"scale_factor": v["scale_factor"], "shift_factor": v["shift_factor"]}
             for k, v in LATENT_STATS.items()}
    bundle = bundle_lib.write_bundle(bundle_lib.ModelParts(cfg, states, stats, "random"), tmp_path / "bundle")
    assert not (bundle / "refiner.safetensors").exists()
    remover = CloudRemover.from_bundle(bundle)
    assert not remover.has_refiner
    clear, _ = _predict(remover, random_scene(64, 64))
    assert clear.shape == (64, 64, 13) and np.all(np.isfinite(clear))
    with pytest.raises(ValueError, match="needs a refiner"):
        remover.predict_tiles({k: v[None] for k, v in random_scene(64, 64).items()}, np.zeros(1, np.int32),
                              steps=STEPS, output="roundtrip_refined")


def test_eight_devices_match_one(run, tmp_path):
    """The bundle on 8 simulated devices (tiles sharded over 'data') gives the 1-device result."""
    _, bundle = run
    scene = random_scene(150, 170)  # 3 x 4 tiles: one full batch of 8 and one padded batch
    np.savez(tmp_path / "scene.npz", **scene)
    one, one_std = _predict(CloudRemover.from_bundle(bundle), scene, num_samples=2, batch_size=8)
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from crrf_jax.inference import CloudRemover
        assert jax.device_count() == 8, jax.devices()
        remover = CloudRemover.from_bundle({str(bundle)!r})
        assert remover.num_devices == 8
        leaf = jax.tree.leaves(remover.nets)[0]
        assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated
        s = dict(np.load({str(tmp_path / "scene.npz")!r}))
        clear, std = remover.remove_clouds(s["s2_cloudy"], s["s1"], s["cloud_prob"], steps={STEPS},
                                           num_samples=2, tile_size={TILE}, overlap={OVERLAP}, batch_size=8)
        np.savez({str(tmp_path / "eight.npz")!r}, clear=clear, std=std)
    """)
    env = dict(os.environ, XLA_FLAGS=with_devices(CHEAP_XLA_FLAGS, 8), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    eight = np.load(tmp_path / "eight.npz")
    np.testing.assert_allclose(eight["clear"], one, atol=2e-5)
    np.testing.assert_allclose(eight["std"], one_std, atol=2e-5)


def test_run_config_round_trip(tmp_path):
    from configs import demo

    config = demo.get_config()
    rundir.save_run_config(config, tmp_path)
    loaded = rundir.load_run_config(tmp_path)
    assert bundle_lib.bundle_config(loaded) == bundle_lib.bundle_config(config)


def test_missing_files_are_named(run, tmp_path):
    workdir, bundle = run
    broken = tmp_path / "bundle"
    shutil.copytree(bundle, broken)
    (broken / "cloud_cnn.safetensors").unlink()
    with pytest.raises(bundle_lib.BundleError, match="cloud_cnn.safetensors"):
        bundle_lib.read_bundle(broken)
    (broken / "config.json").unlink()
    with pytest.raises(bundle_lib.BundleError, match=r"config.json: bundle config missing"):
        CloudRemover.from_bundle(broken)
    with pytest.raises(bundle_lib.BundleError, match="does not exist"):
        bundle_lib.read_bundle(tmp_path / "nowhere")

    stale = tmp_path / "workdir"
    shutil.copytree(workdir, stale)
    (stale / "flow" / "final" / "DONE").unlink()
    with pytest.raises(bundle_lib.BundleError, match=r"flow/final/DONE: stage flow not finished"):
        rundir.read_workdir(stale)
    (stale / "latent_stats" / "latent_stats.json").unlink()
    with pytest.raises(bundle_lib.BundleError, match="latent_stats.json: latent statistics missing"):
        rundir.read_workdir(stale)
    (stale / "config.json").unlink()
    with pytest.raises(bundle_lib.BundleError, match="config.json: training config missing"):
        export.export_bundle(stale, tmp_path / "out")


def test_weights_of_another_model_are_refused(run, tmp_path):
    _, bundle = run
    other = tmp_path / "bundle"
    shutil.copytree(bundle, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model"]["cloud_cnn"]["channels"] = [8, 16, 32]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(bundle_lib.BundleError, match=r"flow\).*missing cloud_encoder/convs/2/bias"):
        CloudRemover.from_bundle(other)


def test_cli(run, tmp_path, capsys, monkeypatch):
    workdir, _ = run
    out = tmp_path / "cli_bundle"
    monkeypatch.chdir(workdir.parent)  # relative paths work (Orbax itself wants absolute ones)
    assert export.main([f"--workdir={workdir.name}", f"--out={out}"]) == 0
    assert (out / "transformer.safetensors").is_file() and not (tmp_path / "cli_bundle.partial").exists()
    assert export.main([f"--workdir={workdir}", f"--out={out}"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert export.main([f"--workdir={tmp_path / 'nowhere'}", f"--out={tmp_path / 'b2'}"]) == 1
    assert "workdir does not exist" in capsys.readouterr().err


def test_config_file_spec():
    config = export.load_config_file(f"{ROOT / 'configs' / 'demo.py'}")
    assert bundle_lib.bundle_config(config)["model"]["variant"] == "tiny"
    with pytest.raises(FileNotFoundError, match="nope.py: config file does not exist"):
        export.load_config_file("nope.py:base")
