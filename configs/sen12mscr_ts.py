"""SEN12MS-CR-TS (time series of Sentinel-1 + Sentinel-2, 13 bands), 3 input dates, the `base` model unless a
variant is given.

    python train.py --config=configs/sen12mscr_ts.py --config.data.root=/data/SEN12MSCRTS --workdir=runs/ts

`root` holds the merged train and test downloads (<region>/<n>/S1|S2/<t>/...; crrf_jax/data/sen12mscr_ts.py
has the layout and UnCRtainTS's ROI split). Inputs are chosen as UnCRtainTS does: a fresh random window of
dates around a clear target per training draw, the fixed choice for val/test (the first 3 dates, the
target the earliest least cloudy one). Before training, train.py caches every date's s2cloudless map
(<root>/<region>/<n>/CLOUDPROB/..., the inputs' cloud_prob) and coverage (the samplers' input,
<root>/sen12mscr_ts_coverage.json): resumable, seconds a date on a CPU, so with
--config.data.worker_count=N processes. Other input counts: --config.data.dates=N.

Config string keys: variant (tiny|base|large|flux), stage, bands ("" = all 13, rgb, or names), dates.
"""

from configs import common


def get_config(arg: str | None = None):
    args = common.config_args(arg, ("variant", "stage", "bands", "dates"))
    c = common.base_config(args.get("variant", "base"), args.get("bands") or None, dataset="sen12mscr_ts")
    c.stage = args.get("stage", "")
    c.data.root = ""  # required: --config.data.root=/path/to/SEN12MSCRTS
    c.data.dates = c.model.max_dates = int(args.get("dates", c.data.dates))
    c.data.crop_size = 256
    c.eval.split = "test"
    return c
