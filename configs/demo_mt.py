"""The multi-temporal demo: a small synthetic Sen2_MTC_New (3 cloudy R, G, B, NIR dates whose clouds move,
no SAR) and the tiny model, every stage, on a CPU.

    python train.py --config=configs/demo_mt.py --workdir=runs/demo_mt

writes the synthetic samples in the official layout into `<workdir>/data` (if none are there;
crrf_jax/data/sen2_mtc.py write_synthetic_sen2_mtc: every date its own clouds, so a pixel cloudy on one date
is mostly clear on another), trains as configs/demo.py does with T = 3 input dates, and evaluates on the
held-out test tile against the least-cloudy-date composite and the single-image references.
"""

from configs import common


def get_config(arg: str | None = None):
    args = common.config_args(arg, ("dates",))
    c = common.base_config("tiny", dataset="sen2_mtc_new")
    # dates=1: the single-image baseline on the same data (each sample's least cloudy date), dates=2: the two
    # least cloudy; the default 3 is every date.
    c.data.dates = c.model.max_dates = int(args.get("dates", c.data.dates))
    c.demo = True
    c.data.root = ""  # "" = <workdir>/data, generated on first use
    c.data.synthetic_scenes = 48  # 12 per tile: 24 train, 12 val, 12 test
    c.data.synthetic_size = 64
    c.data.crop_size = 64
    c.data.worker_count = 0
    c.data.compute_cloud_prob = False
    c.dtype = "float32"

    for stage, steps, lr in (("vae_s2", 600, 2e-3), ("vae_s1", 150, 2e-3), ("flow", 1000, 1e-3),
                             ("refiner", 400, 2e-3)):
        s = c[stage]
        s.steps, s.lr, s.batch_size, s.warmup_steps = steps, lr, 8, 20
        s.ema_decay = 0.99
        s.log_every, s.preview_every, s.checkpoint_every = 25, 500, 500
    c.vae_s2.crop_size = c.vae_s1.crop_size = 32
    c.vae_s2.batch_size = 16
    c.latent_stats.batches, c.latent_stats.batch_size = 8, 8
    c.flow.sample_steps = 2
    c.model.refiner.width = 16
    c.eval.batch_size = 8
    c.eval.num_samples = 2
    return c
