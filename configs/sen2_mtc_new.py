"""Sen2_MTC_New (3 cloudy R, G, B, NIR dates -> 1 clear image, no SAR), the `base` model unless a variant is given.

    python train.py --config=configs/sen2_mtc_new.py --config.data.root=/data/Sen2_MTC_New --workdir=runs/mtc

`root` holds train.txt, val.txt, test.txt and Sen2_MTC/<tile>/ (crrf_jax/data/sen2_mtc.py has the layout
and the published split: 2,380 / 350 / 687 samples by tile). Every sample has exactly 3 cloudy dates
(config.data.dates=3), given to the model as a (3, H, W, 4) stack in date-index order, with one cloud map per
date from the learning-free R, G, B, NIR score (crrf_jax/data/cloudprob.py rgbn_cloud_score). Images are
256 x 256 (crop_size 256: whole images, flips and rotations the same on every date).

Config string keys: variant (tiny|base|large|flux), stage, bands (a subset of B04,B03,B02,B08, or rgb).
"""

from configs import common


def get_config(arg: str | None = None):
    args = common.config_args(arg, ("variant", "stage", "bands"))
    c = common.base_config(args.get("variant", "base"), args.get("bands") or None, dataset="sen2_mtc_new")
    c.stage = args.get("stage", "")
    c.data.root = ""  # required: --config.data.root=/path/to/Sen2_MTC_New
    c.data.crop_size = 256
    c.data.compute_cloud_prob = False  # nothing to cache: the RGBN score is computed on read
    c.eval.split = "test"
    return c
