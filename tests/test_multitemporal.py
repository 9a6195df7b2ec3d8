"""Several cloudy dates end to end below the CLIs: the least-cloudy composite and date dropout, the flow loss
and sampler (one date is the single-image path, bit for bit), and a multi-temporal model without SAR from
its exported bundle to a scene."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_export import make_fake_workdir

from configs import demo
from crrf_jax import export, references, sampling, temporal, train_lib
from crrf_jax import flow as rf
from crrf_jax.inference import CloudRemover
from crrf_jax.models import build

B, D, S = 2, 3, 32  # batch, dates, pixels


def mt_config(dates: int = D, sar: bool = False):
    config = demo.get_config()
    config.model.max_dates, config.model.sar = dates, sar
    return config


def batch(seed: int = 0, dates: int | None = D, bands: int = 13, sar: bool = True) -> dict[str, jnp.ndarray]:
    rng = np.random.default_rng(seed)
    lead = (B,) if dates is None else (B, dates)
    out = {"s2": rng.uniform(0, 0.5, (B, S, S, bands)), "s2_cloudy": rng.uniform(0, 1, (*lead, S, S, bands)),
           "cloud_prob": rng.uniform(0, 1, (*lead, S, S, 1))}
    if sar:
        out["s1"] = rng.uniform(0, 1, (*lead, S, S, 2))
    return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


def test_composite_takes_each_pixel_from_its_least_cloudy_present_date():
    rng = np.random.default_rng(0)
    images, prob = (rng.uniform(size=s).astype(np.float32) for s in ((B, D, 5, 6, 4), (B, D, 5, 6, 1)))
    present = np.array([[True, False, True], [False, True, False]])
    out = np.asarray(temporal.composite(images, prob, present))
    for b in range(B):
        for i in range(5):
            for j in range(6):
                best = min((prob[b, d, i, j, 0], d) for d in range(D) if present[b, d])[1]
                np.testing.assert_array_equal(out[b, i, j], images[b, best, i, j].astype(np.float32))
    # The eval reference is the same composite (all dates present).
    np.testing.assert_array_equal(references.least_cloudy_composite(images[0], prob[0]),
                                  np.asarray(temporal.composite(images, prob))[0])


def test_date_dropout_never_drops_every_date():
    present = np.asarray(temporal.date_dropout(jax.random.key(0), 4096, D, 0.6))
    assert present.any(axis=1).all()
    assert 0.35 < 1 - present.mean() < 0.5  # 0.6 dropped, then one date a sample forced back
    assert temporal.date_dropout(jax.random.key(0), 8, 1, 0.6) is None


@pytest.fixture(scope="module")
def nets():
    config = mt_config(sar=True)
    return build, config, sampling.Networks.of(build.cloud_removal_flux(config.model),
                                               build.autoencoder(config.model, "vae_s2"),
                                               build.autoencoder(config.model, "vae_s1"))


def test_one_date_is_the_single_image_path(nets):
    _, config, networks = nets
    cfg = train_lib.FlowLossConfig.from_config(config.flow)
    one, flat = batch(dates=1), batch(dates=None)
    loss = jax.jit(lambda b: train_lib.flow_loss(networks.flow(), b, jax.random.key(3), networks, cfg=cfg)[0])
    assert float(loss(one)) == float(loss(flat))
    keys = jax.random.split(jax.random.key(1), B)
    sample = jax.jit(lambda b: sampling.sample_patches(networks, b["s2_cloudy"], b["s1"], b["cloud_prob"], keys,
                                                       steps=2, spec=rf.FlowSpec("cloudy", 0.2)))
    np.testing.assert_array_equal(np.asarray(sample(one)[0]), np.asarray(sample(flat)[0]))


def test_flow_loss_learns_from_every_date(nets):
    _, config, networks = nets
    cfg = train_lib.FlowLossConfig.from_config(config.flow)
    x = batch()

    def loss(model, b):
        return train_lib.flow_loss(model, b, jax.random.key(3), networks, cfg=cfg)[0]

    value = float(jax.jit(loss)(networks.flow(), x))
    assert np.isfinite(value)
    # The composite is the source: changing the least-cloudy pixels of any date changes the loss.
    for d in range(D):
        other = dict(x, s2_cloudy=x["s2_cloudy"].at[:, d].add(0.3), cloud_prob=x["cloud_prob"].at[:, d].set(0.0))
        assert float(jax.jit(loss)(networks.flow(), other)) != value


def test_sampling_with_absent_dates_is_sampling_with_fewer_dates(nets):
    """`present` masks a date out of the flow, the composite and the refiner alike (how the refiner stage
    samples with dropped dates): three dates with the third absent give the two-date result, whatever the
    third holds."""
    _, config, networks = nets
    networks = sampling.Networks.of(networks.flow(), networks.vae_s2(), networks.vae_s1(),
                                    build.refiner(config.model))
    x = batch(5)
    x = dict(x, s2_cloudy=x["s2_cloudy"].at[:, 2].set(1.0), cloud_prob=x["cloud_prob"].at[:, 2].set(0.0))
    keys = jax.random.split(jax.random.key(2), B)

    @jax.jit
    def sample(b, present=None):
        return sampling.sample_patches(networks, b["s2_cloudy"], b["s1"], b["cloud_prob"], keys, steps=2,
                                       spec=rf.FlowSpec("cloudy", 0.2), present=present)[0]

    two = sample({k: v[:, :2] if k != "s2" else v for k, v in x.items()})
    masked = sample(x, jnp.array([[True, True, False]] * B))
    np.testing.assert_allclose(np.asarray(masked), np.asarray(two), atol=2e-5)
    assert float(jnp.abs(sample(x, jnp.ones((B, 3), bool)) - two).max()) > 1e-3  # the third date matters


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    config = mt_config(sar=False)
    config.data.bands = "B04,B03,B02,B08"
    workdir = make_fake_workdir(root / "workdir", config=_resized(config))
    bundle = export.export_bundle(workdir, root / "bundle")
    assert not (bundle / "vae_s1.safetensors").exists()
    return bundle


@pytest.fixture(scope="module")
def remover(bundle):
    return CloudRemover.from_bundle(bundle)


def _resized(config):
    """The demo config with the networks sized for its 4 bands (as base_config does for a band spec)."""
    from configs import common

    fresh = common.model_config(config.model.variant, s2_bands=4)
    fresh.max_dates, fresh.sar = config.model.max_dates, config.model.sar
    config.model = fresh
    return config


def test_a_multitemporal_scene_without_sar(remover):
    rng = np.random.default_rng(5)
    s2 = rng.uniform(0, 0.6, (D, 40, 48, 4)).astype(np.float32)
    prob = rng.uniform(0, 1, (D, 40, 48, 1)).astype(np.float32)
    assert remover.max_dates == D
    clear, std = remover.remove_clouds(s2, None, prob, steps=1, tile_size=32, overlap=8, keep_clear=0.3)
    assert clear.shape == std.shape == (40, 48, 4) and np.isfinite(clear).all()
    composite = references.least_cloudy_composite(s2, prob)
    keep = prob.min(axis=0)[..., 0] < 0.3
    np.testing.assert_array_equal(clear[keep], composite[keep])  # clear pixels: the least-cloudy date's
    assert np.abs(clear[~keep] - composite[~keep]).max() > 1e-3
    two, _ = remover.remove_clouds(s2[:2], None, prob[:2], steps=1, tile_size=32, overlap=8)  # any T <= 3
    assert two.shape == (40, 48, 4)
    with pytest.raises(ValueError, match="max_dates=3"):
        remover.remove_clouds(np.concatenate([s2, s2[:1]]), None, np.concatenate([prob, prob[:1]]), steps=1)
    with pytest.raises(ValueError, match="one entry per date"):
        remover.remove_clouds(s2, None, prob[:2], steps=1)


def _write(path, bands_last: np.ndarray, descriptions=None):
    import rasterio
    from rasterio.transform import from_origin

    data = np.moveaxis(bands_last, -1, 0)
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=len(data),
                       dtype=data.dtype, crs="EPSG:32632", transform=from_origin(500000, 4200000, 10, 10)) as ds:
        ds.write(data)
        for i, name in enumerate(descriptions or []):
            ds.set_band_description(i + 1, name)
    return path


def test_predict_cli_takes_several_dates(bundle, remover, tmp_path, capsys):
    import rasterio

    from crrf_jax import predict
    from crrf_jax.data import contract

    rng = np.random.default_rng(8)
    dn = rng.integers(0, 6000, (D, 40, 48, 4)).astype(np.uint16)
    prob = rng.uniform(0, 1, (D, 40, 48, 1)).astype(np.float32)
    s2 = [str(_write(tmp_path / f"s2_{d}.tif", dn[d], ["B04", "B03", "B02", "B08"])) for d in range(D)]
    cp = [str(_write(tmp_path / f"cp_{d}.tif", prob[d])) for d in range(D)]
    out, mask = tmp_path / "clear.tif", tmp_path / "changed.tif"
    args = [f"--bundle={bundle}", *(f"--s2={p}" for p in s2), *(f"--cloud-prob={p}" for p in cp), f"--out={out}",
            f"--change-mask={mask}", "--steps=1", "--tile=32", "--overlap=8", "--keep-clear=0.3", "--quiet"]
    assert predict.main(args) == 0
    expected, _ = remover.remove_clouds(contract.normalize_s2(dn), None, prob, steps=1, tile_size=32, overlap=8,
                                        keep_clear=0.3)
    with rasterio.open(out) as ds, rasterio.open(mask) as changed:
        written = np.moveaxis(ds.read(), 0, -1)
        np.testing.assert_array_equal(written, contract.denormalize_s2(expected))
        kept = prob.min(axis=0)[..., 0] < 0.3  # the least-cloudy date's pixels, unchanged
        composite = references.least_cloudy_composite(dn, prob)
        np.testing.assert_array_equal(written[kept], composite[kept])
        assert not changed.read(1)[kept].any()
        assert ds.tags()["dates"] == str(D)
    assert predict.main([*args[:1], *(f"--s2={p}" for p in [*s2, s2[0]]), *args[1 + D:]]) == 1
    assert "this model takes 1 to max_dates=3" in capsys.readouterr().err
    assert predict.main([a for a in args if a != f"--cloud-prob={cp[2]}"]) == 1
    assert "2 cloud-probability files for 3 Sentinel-2 dates" in capsys.readouterr().err
