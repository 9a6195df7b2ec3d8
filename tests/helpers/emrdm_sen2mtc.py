"""REFERENCE, not crrf_jax code: EMRDM's Sen2_MTC_New scoring path, re-typed in torch from its source so that
tests can pin `crrf_jax.rgb_metrics.batch_metrics_sen2mtc` / `Sen2MTCScorer` against it.

Read from github.com/Ly403/EMRDM (HEAD): `sgm/util.py::sen_mtc_scale_01.get_rgb` (its 3-channel branch),
`sgm/modules/learning/metrics.py::img_metrics` (the metrics without masks or variances) and
`sgm/modules/learning/pytorch_ssim/__init__.py::ssim`; `sgm/models/diffusion.py` calls them per image as
`img_metrics(target=scale_01(target[i])[None], pred=scale_01(samples[i])[None])`. Kept as close to the source
as possible (same torch operations, in the same order); only the structure is flattened into functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sen_mtc_scale_01(batch_image: torch.Tensor) -> torch.Tensor:
    """EMRDM's `sen_mtc_scale_01.get_rgb(batch_image, ir=False)`: (B, 3, H, W) on [-1, 1] -> (B, 3, H, W)."""
    out = batch_image.mul(0.5).add(0.5)
    out = out.mul(10000).add(0.5).clamp(0, 10000)
    out = out.permute(0, 2, 3, 1)
    out = out.to(torch.long)
    rgb_images = []
    for image in out:
        r = torch.clip(image[:, :, 0], 0, 2000)
        g = torch.clip(image[:, :, 1], 0, 2000)
        b = torch.clip(image[:, :, 2], 0, 2000)
        rgb = torch.stack((r, g, b), -1)
        rgb = rgb - torch.min(torch.nan_to_num(rgb, 10001))
        rgb_max = torch.max(torch.nan_to_num(rgb, -1))
        if rgb_max == 0:
            rgb = 1.0 * torch.ones_like(rgb)
        else:
            rgb = 1.0 * (rgb / rgb_max)
        rgb[torch.isnan(rgb)] = torch.nanmean(rgb)
        rgb_images.append(rgb)
    return torch.stack(rgb_images).permute(0, 3, 1, 2)


def _gaussian(window_size: int, sigma: float) -> torch.Tensor:
    gauss = torch.Tensor([math.exp(-(x - window_size // 2) ** 2 / float(2 * sigma**2)) for x in range(window_size)])
    return gauss / gauss.sum()


def ssim(img1: torch.Tensor, img2: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """EMRDM's (UnCRtainTS's) `pytorch_ssim.ssim(img1, img2)` with size_average=True."""
    channel = img1.size(1)
    w1 = _gaussian(window_size, 1.5).unsqueeze(1)
    window = w1.mm(w1.t()).float().unsqueeze(0).unsqueeze(0).expand(channel, 1, window_size, window_size)
    window = window.contiguous().type_as(img1)
    pad = window_size // 2
    mu1 = F.conv2d(img1, window, padding=pad, groups=channel)
    mu2 = F.conv2d(img2, window, padding=pad, groups=channel)
    mu1_sq, mu2_sq, mu1_mu2 = mu1.pow(2), mu2.pow(2), mu1 * mu2
    sigma1_sq = F.conv2d(img1 * img1, window, padding=pad, groups=channel) - mu1_sq
    sigma2_sq = F.conv2d(img2 * img2, window, padding=pad, groups=channel) - mu2_sq
    sigma12 = F.conv2d(img1 * img2, window, padding=pad, groups=channel) - mu1_mu2
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return ssim_map.mean()


def img_metrics(target: torch.Tensor, pred: torch.Tensor, loss_fn_alex=None) -> dict[str, float]:
    """EMRDM's `img_metrics(target, pred)` of (1, C, H, W) images; LPIPS when C == 3 and `loss_fn_alex` (the
    module-level `lpips.LPIPS(net='alex')` there) is given."""
    rmse = torch.sqrt(torch.mean(torch.square(target - pred)))
    psnr = 20 * torch.log10(1 / rmse)
    mae = torch.mean(torch.abs(target - pred))
    mat = target * pred
    mat = torch.sum(mat, 1)
    mat = torch.div(mat, torch.sqrt(torch.sum(target * target, 1)))
    mat = torch.div(mat, torch.sqrt(torch.sum(pred * pred, 1)))
    sam = torch.mean(torch.acos(torch.clamp(mat, -1, 1)) * torch.tensor(180) / math.pi)
    out = {"RMSE": rmse.item(), "MAE": mae.item(), "PSNR": psnr.item(), "SAM": sam.item(),
           "SSIM": ssim(target, pred).item()}
    if loss_fn_alex is not None and target.shape[1] == pred.shape[1] == 3:
        with torch.no_grad():
            out["LPIPS"] = loss_fn_alex(target * 2 - 1, pred * 2 - 1).item()
    return out


def score(target01, pred01, loss_fn_alex=None) -> dict[str, float]:
    """One (H, W, 3) R, G, B pair on [0, 1] (DN / 10000; NumPy float32) the way EMRDM's diffusion engine scores
    it: into its network space (x - 0.5) / 0.5 as its data loader does, `sen_mtc_scale_01`, `img_metrics`."""
    def network(x):
        return (torch.from_numpy(x).permute(2, 0, 1)[None] - 0.5) / 0.5

    return img_metrics(sen_mtc_scale_01(network(target01)), sen_mtc_scale_01(network(pred01)), loss_fn_alex)
