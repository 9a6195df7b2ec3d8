"""The embedded default: a small synthetic SEN12MS-CR dataset and the tiny model, every stage, on a CPU.

    python train.py --config=configs/demo.py --workdir=runs/demo

writes synthetic scenes in the official layout into `<workdir>/data` (if none are there), computes their
s2cloudless cloud probability, trains the S2 VAE, the S1 VAE, measures latent statistics, trains the flow
model (on the training set's latents, encoded once) and the pixel-space refiner, evaluates it on the held-out (test-split) synthetic scenes against the
cloudy input and the learning-free references, exports a bundle and removes clouds from a larger demo scene.
Minutes on a laptop CPU.
"""

from configs import common


def get_config(arg: str | None = None):
    del arg
    c = demo_settings(common.base_config("tiny"))
    # The flow stage trains on latents encoded once (`latent_cache`): 700 steps in 18-19 s instead of 51-55 s,
    # and the same held-out quality over two seeds (BENCHMARKS.md, "Demo job"). Single-date models with SAR
    # only: configs/demo_mt.py keeps encoding every batch.
    c.flow.cache_latents = True
    return c


# Training steps of the demo's stages. The S2 autoencoder and the flow train less than the refiner, which does
# most of the work at this scale (BENCHMARKS.md, "Demo job"): the 10-minute budget of the quick start goes to it.
STEPS = {"vae_s2": 300, "vae_s1": 100, "flow": 700, "refiner": 400}


def demo_settings(c, steps=None):
    """The demo's data sizes and training schedule (`steps`: {stage: steps}, default STEPS) on a config of the
    tiny model (configs/demo_mt.py too)."""
    steps = {**STEPS, **(steps or {})}
    c.demo = True
    c.data.root = ""  # "" = <workdir>/data, generated on first use
    c.data.synthetic_scenes = 48
    c.data.synthetic_size = 64
    c.data.crop_size = 64
    c.data.worker_count = 0
    c.data.cache = True  # 48 small scenes read once, then from memory (host time of a VAE batch 138 -> 14 ms)
    c.dtype = "float32"

    for stage, lr in (("vae_s2", 2e-3), ("vae_s1", 2e-3), ("flow", 1e-3), ("refiner", 2e-3)):
        s = c[stage]
        s.steps, s.lr, s.batch_size, s.warmup_steps = steps[stage], lr, 8, 20
        s.ema_decay = 0.99
        s.log_every, s.preview_every, s.checkpoint_every = 25, 500, 500  # previews sample: keep them few
    # The autoencoders are fully convolutional: batches of 16 32x32 crops cost half of 8 64x64 patches.
    c.vae_s2.crop_size = c.vae_s1.crop_size = 32
    c.vae_s2.batch_size = 16
    c.latent_stats.batches, c.latent_stats.batch_size = 8, 8
    c.flow.sample_steps = 2  # from the cloudy source 1 or 2 Euler steps do as well as 8 (BENCHMARKS.md)
    c.model.refiner.width = 16
    c.eval.batch_size = 8
    c.eval.num_samples = 2  # two samples per image: their spread is the uncertainty map of the pictures
    return c
