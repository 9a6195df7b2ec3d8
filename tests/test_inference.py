"""Tiling, blending and CloudRemover on arrays.

Blending is checked with deterministic fake predictors (a random-weight model's output is noise, so seams
could not be told from it): an identity predictor must give the input back exactly (every pixel's weights
normalise), and tiles of different constant values must blend into a continuous image. The sampler is pinned
against crrf_jax.flow's Euler sampler with classifier-free guidance.
"""

from __future__ import annotations

import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_export import OVERLAP, STEPS, TILE, fake_run, random_scene

from crrf_jax import flow as rf
from crrf_jax import sampling, tiling
from crrf_jax.inference import CloudRemover
from crrf_jax.tiling import TileLayout, blend_tiles


@pytest.fixture(scope="module")
def remover(tmp_path_factory) -> CloudRemover:
    _, bundle = fake_run(tmp_path_factory)
    return CloudRemover.from_bundle(bundle)


# ------------------------------------------------------------------------------------------------------------
# Tiling with fake predictors
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length,tile,overlap", [(500, 64, 16), (700, 64, 16), (256, 256, 32), (40, 64, 16),
                                                 (1000, 256, 32), (65, 64, 0)])
def test_tile_starts_cover_with_overlap(length, tile, overlap):
    starts = tiling.tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == max(length, tile)
    gaps = np.diff(starts)
    assert np.all(gaps > 0) and np.all(tile - gaps >= overlap)  # consecutive tiles overlap by >= overlap
    if len(starts) > 1:  # and no more tiles than needed
        assert len(starts) - 1 < (max(length, tile) - tile) / (tile - overlap) + 1


def _run(layout: TileLayout, scene: dict, predict, batch_size: int = 7,
         in_flight: int = tiling.IN_FLIGHT_BATCHES):
    """blend_tiles over an in-memory scene; returns (mean, std, events)."""
    padded = {k: tiling.pad_to(v, layout.padded_height, layout.padded_width) for k, v in scene.items()}
    c = scene["s2_cloudy"].shape[-1]
    mean = np.full((layout.height, layout.width, c), np.nan, np.float32)
    std = np.full_like(mean, np.nan)
    events = []

    def read(y0, y1):
        events.append(("read", y0, y1))
        return {k: v[y0:y1] for k, v in padded.items()}

    def write(y0, y1, m, s):
        events.append(("write", y0, y1) if s is not None else ("write without std", y0, y1))
        mean[y0:y1] = m
        if s is not None:
            std[y0:y1] = s

    blend_tiles(layout, read, predict, write, batch_size=batch_size, in_flight=in_flight)
    return mean, std, events


def _identity(tiles, ids):
    return lambda: (tiles["s2_cloudy"], 0.5 * tiles["s2_cloudy"])


@pytest.mark.parametrize("height,width", [(500, 700), (100, 100), (40, 50), (64, 64)])
def test_identity_predictor_gives_the_scene_back(height, width):
    rng = np.random.default_rng(0)
    scene = {"s2_cloudy": rng.uniform(0, 1, (height, width, 3)).astype(np.float32)}
    layout = TileLayout(height, width, TILE, OVERLAP)
    mean, std, events = _run(layout, scene, _identity)
    np.testing.assert_allclose(mean, scene["s2_cloudy"], atol=1e-6)
    np.testing.assert_allclose(std, 0.5 * scene["s2_cloudy"], atol=1e-6)
    writes = [(y0, y1) for kind, y0, y1 in events if kind == "write"]
    assert writes[0][0] == 0 and writes[-1][1] == height
    assert all(a[1] == b[0] for a, b in zip(writes, writes[1:], strict=False))  # contiguous, in order
    reads = [(y0, y1) for kind, y0, y1 in events if kind == "read"]
    assert all(y1 - y0 == TILE for y0, y1 in reads) and len(reads) == len(layout.ys)


@pytest.mark.parametrize("in_flight", [0, 2])
def test_rows_are_written_while_reading_goes_on(in_flight):
    """Memory stays bounded: when row r of tiles is read (ahead, in the reading thread), the rows above row
    r - 2 are already written, less the rows of the 2 x in_flight batches submitted or queued for blending
    and of the one band of rows queued for writing."""
    layout = TileLayout(500, 300, TILE, OVERLAP)  # 6 tiles a row, batches of 4: a batch spans <= 2 rows
    _, _, events = _run(layout, {"s2_cloudy": np.zeros((500, 300, 1), np.float32)}, _identity, batch_size=4,
                        in_flight=in_flight)
    lag = 2 + -(-2 * in_flight * 4 // len(layout.xs)) + min(in_flight, 1)
    written = 0
    for kind, y0, y1 in events:
        if kind == "write":
            written = y1
        elif (r := layout.ys.index(y0)) >= lag:
            assert written >= layout.ys[r - lag], (r, written)


@pytest.mark.parametrize("in_flight", [0, 1, 2, 5])
@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_the_blend_does_not_depend_on_in_flight_or_batch_size(in_flight, batch_size):
    layout = TileLayout(300, 260, TILE, OVERLAP)
    values = np.random.default_rng(2).uniform(0, 1, layout.num_tiles)
    scene = {"s2_cloudy": np.zeros((300, 260, 1), np.float32)}
    reference, _, _ = _run(layout, scene, _constant_tiles(layout, values), batch_size=3, in_flight=0)
    mean, _, _ = _run(layout, scene, _constant_tiles(layout, values), batch_size=batch_size,
                      in_flight=in_flight)
    np.testing.assert_array_equal(mean, reference)



@pytest.mark.parametrize("height,width,batch_size", [
    (1000, 40, 8),  # one tile a row: a batch spans 8 rows of tiles, the band buffers grow
    (1500, 300, 4),  # many rows of tiles: the held rows move up many times
    (90, 700, 5),  # wide and short
])
def test_the_blend_is_the_dense_weighted_mean_bit_for_bit(height, width, batch_size):
    """The streaming blend, with its reused band buffers, equals the whole-scene computation: every tile's
    window times its values summed in tile order, over the summed windows (the same float32 sums)."""
    layout = TileLayout(height, width, TILE, OVERLAP)
    rng = np.random.default_rng(4)
    noise = rng.uniform(0, 1, (layout.num_tiles, TILE, TILE, 2)).astype(np.float32)

    def predict(tiles, ids):
        return lambda: (noise[ids], 0.25 * noise[ids])

    scene = {"s2_cloudy": np.zeros((height, width, 2), np.float32)}
    mean, std, _ = _run(layout, scene, predict, batch_size=batch_size)
    sums = np.zeros((2, layout.padded_height, layout.padded_width, 2), np.float32)
    weight = np.zeros((layout.padded_height, layout.padded_width), np.float32)
    for k, (r, c) in enumerate((r, c) for r in range(len(layout.ys)) for c in range(len(layout.xs))):
        y, x, w = layout.ys[r], layout.xs[c], layout.window(r, c)
        sums[0, y : y + TILE, x : x + TILE] += w[..., None] * noise[k]
        sums[1, y : y + TILE, x : x + TILE] += w[..., None] * (0.25 * noise[k])
        weight[y : y + TILE, x : x + TILE] += w
    expected = (sums / weight[..., None])[:, :height, :width]
    np.testing.assert_array_equal(mean, expected[0])
    np.testing.assert_array_equal(std, expected[1])

def test_batches_without_a_std_blend_the_same_mean_and_write_none():
    layout = TileLayout(300, 260, TILE, OVERLAP)
    values = np.random.default_rng(3).uniform(0, 1, layout.num_tiles)
    scene = {"s2_cloudy": np.zeros((300, 260, 1), np.float32)}
    constant = _constant_tiles(layout, values)
    reference, _, _ = _run(layout, scene, constant)

    def without_std(tiles, ids):
        wait = constant(tiles, ids)
        return lambda: (wait()[0], None)

    mean, std, events = _run(layout, scene, without_std)
    np.testing.assert_array_equal(mean, reference)
    writes = {kind for kind, *_ in events if kind.startswith("write")}
    assert np.isnan(std).all() and writes == {"write without std"}

    def some_without(tiles, ids):  # a std in some batches and not in others is a caller's bug
        wait = constant(tiles, ids)
        return lambda: (wait()[0], None if ids[0] % 2 else wait()[1])

    with pytest.raises(ValueError, match="every batch must come with a std, or none"):
        _run(layout, scene, some_without, batch_size=1)


def _logged(layout: TileLayout, log: list):
    """An identity predictor that logs ("submit", k) and ("wait", k) for batch k, and the thread of each."""
    def predict(tiles, ids):
        k = int(ids[0])
        log.append(("submit", k, threading.current_thread().name))

        def wait():
            log.append(("wait", k, threading.current_thread().name))
            return tiles["s2_cloudy"], np.zeros_like(tiles["s2_cloudy"])

        return wait

    return predict


@pytest.mark.parametrize("in_flight", [0, 1, 3])
def test_batches_are_submitted_ahead_and_waited_for_in_order(in_flight):
    """Up to in_flight batches are submitted before the oldest is waited for; every submit and wait happens
    in the caller's thread, in order (collectives across processes need both)."""
    layout = TileLayout(200, 200, TILE, OVERLAP)
    log = []
    _run(layout, {"s2_cloudy": np.zeros((200, 200, 1), np.float32)}, _logged(layout, log), batch_size=1,
         in_flight=in_flight)
    calls = [(kind, k) for kind, k, _ in log]
    assert {name for *_, name in log} == {threading.current_thread().name}
    assert [k for kind, k in calls if kind == "submit"] == list(range(layout.num_tiles))
    assert [k for kind, k in calls if kind == "wait"] == list(range(layout.num_tiles))
    for k in range(layout.num_tiles):  # batch k is waited for once batch k + in_flight is submitted
        before = calls[: calls.index(("wait", k))]
        assert sum(kind == "submit" for kind, _ in before) == min(k + in_flight + 1, layout.num_tiles)


@pytest.mark.parametrize("in_flight", [0, 2])
def test_writing_overlaps_the_next_batches(in_flight):
    """With batches in flight, rows are written in a thread of their own while the caller's thread goes on
    submitting: each write of a band waits for the next tile row's first batch to be submitted. Done in turn
    (in_flight=0), the next batch is only submitted after the write, so that wait times out."""
    layout = TileLayout(260, 200, TILE, OVERLAP)  # 4 x 4 tiles; batches of 4: one tile row each
    submitted = [threading.Event() for _ in range(len(layout.ys) + 1)]
    came, writers = [], set()

    def predict(tiles, ids):
        submitted[int(ids[0]) // len(layout.xs)].set()
        return lambda: (tiles["s2_cloudy"], np.zeros_like(tiles["s2_cloudy"]))

    def write(y0, y1, mean, std):
        writers.add(threading.current_thread().name)
        row = next(r for r, y in enumerate(layout.ys) if y >= y1) if y1 < layout.height else None
        if row is not None:
            came.append(submitted[row].wait(timeout=5.0 if in_flight else 0.5))

    blend_tiles(layout, lambda y0, y1: {"s2_cloudy": np.zeros((y1 - y0, 200, 1), np.float32)}, predict, write,
                batch_size=4, in_flight=in_flight)
    assert threading.current_thread().name not in writers and len(writers) == 1
    assert came and all(came) if in_flight else not any(came)


def test_errors_of_the_writing_thread_and_of_a_batch_reach_the_caller():
    layout = TileLayout(300, 300, TILE, OVERLAP)
    scene = {"s2_cloudy": np.zeros((300, 300, 1), np.float32)}

    def write(y0, y1, mean, std):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        blend_tiles(layout, lambda y0, y1: {k: v[y0:y1] for k, v in scene.items()}, _identity, write)

    def failing(tiles, ids):
        def wait():
            if ids[0] >= 5:
                raise RuntimeError("device lost")
            return tiles["s2_cloudy"], tiles["s2_cloudy"]
        return wait

    with pytest.raises(RuntimeError, match="device lost"):
        _run(layout, scene, failing, batch_size=1)
    with pytest.raises(ValueError, match="in_flight must be >= 0"):
        _run(layout, scene, _identity, in_flight=-1)


def _constant_tiles(layout: TileLayout, values: np.ndarray):
    def predict(tiles, ids):
        n = len(ids)
        mean = np.broadcast_to(values[ids][:, None, None, None], (n, layout.tile, layout.tile, 1))
        return lambda: (mean.astype(np.float32), np.zeros_like(mean, np.float32))

    return predict


def _max_step(image: np.ndarray) -> float:
    return max(np.abs(np.diff(image, axis=0)).max(), np.abs(np.diff(image, axis=1)).max())


def test_seams_do_not_show_on_a_500x700_scene():
    """Tiles of very different constant values blend into a smooth image: no pixel step is larger than the
    raised-cosine ramp allows, and the steps at the tile edges are no larger than elsewhere."""
    layout = TileLayout(500, 700, TILE, OVERLAP)
    values = np.random.default_rng(1).uniform(0, 1, layout.num_tiles)
    spread = values.max() - values.min()
    scene = {"s2_cloudy": np.zeros((500, 700, 1), np.float32)}
    mean, _, _ = _run(layout, scene, _constant_tiles(layout, values))
    assert np.all(np.isfinite(mean))
    ramp_slope = np.pi / (2 * OVERLAP)  # largest step of sin^2 over `overlap` pixels, per unit of value
    assert _max_step(mean) <= 1.05 * ramp_slope * spread

    # The mean step across every tile edge (where an unblended mosaic would jump) vs over the whole image.
    edges = sorted({x + TILE for x in layout.xs[:-1]} | {x for x in layout.xs[1:]})
    col_steps = np.abs(np.diff(mean[..., 0], axis=1))
    at_edges = col_steps[:, [e - 1 for e in edges]].mean()
    assert at_edges <= 1.5 * col_steps.mean() + 1e-6

    # Control: abutting tiles without blending show the seams this test is looking for.
    hard = TileLayout(500, 700, TILE, 0)
    hard_values = np.random.default_rng(1).uniform(0, 1, hard.num_tiles)
    hard_mean, _, _ = _run(hard, scene, _constant_tiles(hard, hard_values))
    assert _max_step(hard_mean) > 3 * ramp_slope * spread


def test_layout_checks():
    with pytest.raises(ValueError, match="overlap 40 must be in"):
        TileLayout(100, 100, 64, 40)
    with pytest.raises(ValueError, match="empty"):
        TileLayout(0, 100, 64, 16)


# ------------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------------


def _remove(remover, scene, **kw):
    kw = dict(steps=STEPS, num_samples=2, tile_size=TILE, overlap=OVERLAP) | kw
    return remover.remove_clouds(scene["s2_cloudy"], scene.get("s1"), scene.get("cloud_prob"), **kw)


@pytest.mark.parametrize("height,width", [(100, 100), (40, 50)])
def test_any_scene_size(remover, height, width):
    scene = random_scene(height, width)
    clear, std = _remove(remover, scene)
    assert clear.shape == std.shape == (height, width, 13) and clear.dtype == np.float32
    assert np.all(np.isfinite(clear)) and clear.min() >= 0 and clear.max() <= 1
    assert std.min() >= 0 and std.max() > 0
    again, _ = _remove(remover, scene)
    np.testing.assert_array_equal(clear, again)


def test_one_sample_leaves_the_std_on_the_device_and_returns_zeros(remover):
    scene = random_scene(100, 100)
    tiles = {k: v[None, :TILE, :TILE] for k, v in scene.items()}
    ids = np.zeros(1, np.int32)
    mean, std = remover.predict_tiles(tiles, ids, steps=STEPS)
    alone, none = remover.predict_tiles(tiles, ids, steps=STEPS, with_std=False)
    assert none is None and not std.any()
    np.testing.assert_array_equal(alone, mean)
    kept, none = remover.predict_tiles(tiles, ids, steps=STEPS, with_std=False, keep_clear=0.3)
    assert none is None and kept.shape == mean.shape
    clear, std = _remove(remover, scene, num_samples=1)  # the scene path asks for no std with one sample
    assert std.shape == clear.shape and not std.any()


def test_cloud_probability_is_computed_when_absent(remover):
    from crrf_jax.data import cloudprob

    scene = random_scene(100, 100, seed=5)
    given = dict(scene, cloud_prob=cloudprob.cloud_probability(scene["s2_cloudy"][None])[0])
    computed, _ = _remove(remover, dict(scene, cloud_prob=None))
    expected, _ = _remove(remover, given)
    np.testing.assert_array_equal(computed, expected)


def test_without_sar_warns_and_uses_the_sar_absent_mode(remover, caplog):
    scene = random_scene(40, 50)
    with caplog.at_level(logging.WARNING, logger="crrf_jax.inference"):
        without, _ = _remove(remover, dict(scene, s1=None))
    assert "degraded SAR-absent mode" in caplog.text
    with_sar, _ = _remove(remover, scene)
    assert np.all(np.isfinite(without)) and np.abs(without - with_sar).max() > 1e-3


def test_tiles_outside_the_sar_footprint_run_the_sar_absent_mode(remover):
    """A tile whose "s1_coverage" is below SAR_COVERAGE gives the SAR-absent prediction (whatever the filled
    SAR values say); a covered tile the SAR-conditioned one; tiles are independent of their batch mates."""
    from crrf_jax.inference import SAR_COVERAGE

    scene = random_scene(TILE, TILE, seed=3)
    tiles = {k: np.stack([v, v]) for k, v in scene.items()}
    coverage = np.ones((2, TILE, TILE), bool)
    coverage[1, : TILE // 2] = False  # tile 1: half outside the footprint
    ids = np.array([0, 1])
    kw = dict(steps=STEPS)
    mixed, _ = remover.predict_tiles(dict(tiles, s1_coverage=coverage), ids, **kw)
    with_sar, _ = remover.predict_tiles(tiles, ids, **kw)
    without, _ = remover.predict_tiles({k: v for k, v in tiles.items() if k != "s1"}, ids, **kw)
    np.testing.assert_allclose(mixed[0], with_sar[0], atol=1e-6)
    np.testing.assert_allclose(mixed[1], without[1], atol=1e-6)
    assert np.abs(with_sar[1] - without[1]).max() > 1e-3  # the two modes differ, so the check means something
    almost = coverage.copy()
    almost[1] = True
    almost[1, 0, : int(TILE * TILE * (1 - SAR_COVERAGE)) // 2] = False  # a few pixels short: still covered
    nearly, _ = remover.predict_tiles(dict(tiles, s1_coverage=almost), ids, **kw)
    np.testing.assert_allclose(nearly[1], with_sar[1], atol=1e-6)


def test_predict_batch_matches_flow_euler_sampler_with_guidance(remover):
    """predict_batch = decode(flow.euler_sample(v_cond, noise, schedule, s, v_uncond)) on per-patch noise."""
    flow_model = nnx.merge(remover.nets.flow_graph, remover.nets.flow_state)
    vae_s2 = nnx.merge(remover.nets.s2_graph, remover.nets.s2_state)
    vae_s1 = nnx.merge(remover.nets.s1_graph, remover.nets.s1_state)
    scene = random_scene(64, 64, seed=2)
    batch = {k: jnp.asarray(np.stack([v, v[::-1]])) for k, v in scene.items()}
    rng, scale = jax.random.key(7), 2.0
    mean, std = sampling.predict_batch(flow_model, vae_s2, vae_s1, batch, rng, steps=STEPS,
                                        guidance_scale=scale, num_samples=1)

    cloudy = vae_s2.encode(batch["s2_cloudy"] * 2 - 1)
    sar = vae_s1.encode(batch["s1"] * 2 - 1)
    keys = jax.random.split(rng, 2)
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(k, 0), cloudy.shape[1:]) for k in keys])
    drop = jnp.ones((2,), bool)

    # The model is rebuilt inside the velocity functions: its nnx.scan refuses Variables created outside
    # the sampler's loop.
    def model():
        return nnx.merge(remover.nets.flow_graph, jax.tree.map(jnp.asarray, remover.nets.flow_state))

    def v_cond(x, t):
        return model()(x, t, cloudy, sar, batch["cloud_prob"])

    def v_uncond(x, t):
        return model()(x, t, cloudy, sar, batch["cloud_prob"], drop_sar=drop, drop_cloudy=drop)

    schedule = rf.timesteps(STEPS, (64 // 16) ** 2)
    x0 = rf.euler_sample(v_cond, noise, schedule, scale, v_uncond)
    expected = jnp.clip((vae_s2.decode(x0) + 1) / 2, 0, 1)
    np.testing.assert_allclose(np.asarray(mean), np.asarray(expected), atol=2e-5)
    assert float(jnp.abs(std).max()) == 0.0  # one sample: no spread


def test_bad_inputs_are_refused(remover):
    scene = random_scene(64, 64)
    with pytest.raises(ValueError, match="s2_cloudy has 5 bands; the model uses 13"):
        _remove(remover, dict(scene, s2_cloudy=scene["s2_cloudy"][..., :5]))
    with pytest.raises(ValueError, match="divide S2 DN by 10000"):
        _remove(remover, dict(scene, s2_cloudy=scene["s2_cloudy"] * 10000))
    with pytest.raises(ValueError, match=r"s1 must be \(64, 64, 2\)"):
        _remove(remover, dict(scene, s1=scene["s1"][:32]))
    with pytest.raises(ValueError, match=r"cloud_prob must be \(64, 64, 1\)"):
        _remove(remover, dict(scene, cloud_prob=scene["cloud_prob"][:, :10]))
    with pytest.raises(ValueError, match="tile size 40 must be a positive multiple of 16"):
        _remove(remover, scene, tile_size=40)
    with pytest.raises(ValueError, match="overlap 48 must be in"):
        _remove(remover, scene, overlap=48)
