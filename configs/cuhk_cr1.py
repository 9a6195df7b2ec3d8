"""CUHK-CR1 (thin clouds; R, G, B, NIR 8-bit images, no SAR), the `base` model unless a variant is given.

    python train.py --config=configs/cuhk_cr1.py --config.data.root=/data/C-CUHK --workdir=runs/cuhk_cr1

`root` is the extracted archive (EMRDM's `C-CUHK`: CUHK-CR1/ and nir/CUHK-CR1/; crrf_jax/data/cuhk_cr.py
has the layout). Splits are the archive's folders (534 train / 134 test, no validation folder); eval scores the
test folder. As EMRDM, every 512 x 512 image is halved to 256 x 256 before training and testing
(config.data.downsample=2: antialiased bicubic, crrf_jax/data/sources.py downsample_bicubic); training
takes the whole halved image (crop_size 256) with flips and rotations. The cloud map is the learning-free
R, G, B, NIR score (crrf_jax/data/cloudprob.py rgbn_cloud_score): s2cloudless needs 13 bands.

Config string keys: variant (tiny|base|large|flux), stage, bands (a subset of B04,B03,B02,B08, or rgb).
"""

from configs import common


def get_config(arg: str | None = None):
    return cuhk_config(arg, "cuhk_cr1")


def cuhk_config(arg: str | None, dataset: str):
    """CUHK-CR1 or CUHK-CR2 (`dataset`): the two differ in their data alone."""
    args = common.config_args(arg, ("variant", "stage", "bands"))
    c = common.base_config(args.get("variant", "base"), args.get("bands") or None, dataset=dataset)
    c.stage = args.get("stage", "")
    c.data.root = ""  # required: --config.data.root=/path/to/C-CUHK
    c.data.downsample = 2
    c.data.crop_size = 256
    c.data.compute_cloud_prob = False  # nothing to cache: the RGBN score is computed on read
    c.eval.split = "test"
    return c
