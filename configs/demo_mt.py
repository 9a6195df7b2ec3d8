"""The multi-temporal demo: a small synthetic Sen2_MTC_New (3 cloudy R, G, B, NIR dates whose clouds move,
no SAR) and the tiny model, every stage, on a CPU.

    python train.py --config=configs/demo_mt.py --workdir=runs/demo_mt

writes the synthetic samples in the official layout into `<workdir>/data` (if none are there;
crrf_jax/data/sen2_mtc.py write_synthetic_sen2_mtc: every date its own clouds, so a pixel cloudy on one date
is mostly clear on another), trains as configs/demo.py does with T = 3 input dates, and evaluates on the
held-out test tile against the least-cloudy-date composite and the single-image references.
"""

from configs import common, demo


def get_config(arg: str | None = None):
    args = common.config_args(arg, ("dates",))
    c = common.base_config("tiny", dataset="sen2_mtc_new")
    # dates=1: the single-image baseline on the same data (each sample's least cloudy date), dates=2: the two
    # least cloudy; the default 3 is every date.
    c.data.dates = c.model.max_dates = int(args.get("dates", c.data.dates))
    c = demo.demo_settings(c)  # 48 samples of 64 x 64 (12 per tile: 24 train, 12 val, 12 test), its schedule
    c.data.compute_cloud_prob = False  # nothing to cache: the RGBN score is computed on read
    return c
