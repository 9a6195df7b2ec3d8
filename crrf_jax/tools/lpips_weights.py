"""Makes the LPIPS-alex weights file that `crrf_jax.models.lpips.load_lpips` (eval.py --lpips_weights) reads.

    python -m crrf_jax.tools.lpips_weights \
        --alexnet alexnet-owt-7be5be79.pth --lin .../site-packages/lpips/weights/v0.1/alex.pth \
        --out lpips_alex.safetensors

--alexnet: torchvision's ImageNet AlexNet file (`torchvision.models.AlexNet_Weights.IMAGENET1K_V1`; its `.url`
prints where torchvision gets it); --lin: the LPIPS heads that the `lpips` PyPI package ships in
`lpips/weights/v0.1/alex.pth`. These are the two files `lpips.LPIPS(net='alex')` loads. Both are read with
`torch.load(..., weights_only=True)` (no pickled code runs) on the CPU; this tool needs torch, nothing else
downloads or needs the network. The output holds the `lpips.LPIPS(net='alex').state_dict()` names
(`net.slice{s}.{i}.weight|bias`, `lin{k}.model.1.weight`), checked against `lpips.state_dict_shapes()`.

Where `lpips` and torchvision both import, the package's own state dict works too (it names each head twice,
as `lin{k}` and `lins.{k}`; safetensors wants one of them):
`safetensors.torch.save_file({k: v for k, v in lpips.LPIPS(net='alex').state_dict().items()
if not k.startswith('lins.')}, 'lpips_alex.safetensors')`.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from crrf_jax.models import lpips as L


def convert(alexnet: dict, lin: dict) -> dict[str, np.ndarray]:
    """torchvision AlexNet (`features.{i}.*`, the classifier is dropped) + LPIPS heads -> LPIPS state dict."""
    slices = {i: s for s, i, *_ in L.ALEX_CONVS}
    out = {}
    for key, value in alexnet.items():
        parts = key.split(".")
        if parts[0] == "features" and int(parts[1]) in slices:
            out[f"net.slice{slices[int(parts[1])]}.{parts[1]}.{parts[2]}"] = value
    out |= {key: value for key, value in lin.items() if key.startswith("lin")}
    out = {key: np.ascontiguousarray(value.detach().cpu().float().numpy()) for key, value in out.items()}
    expected = L.state_dict_shapes()
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"missing {missing}: --alexnet must hold torchvision's features.{{0,3,6,8,10}} and --lin "
                         "the lpips package's lin0..lin4")
    for key, shape in expected.items():
        if out[key].shape != shape:
            raise ValueError(f"{key}: shape {out[key].shape}, expected {shape} (not LPIPS-alex weights?)")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alexnet", required=True, help="torchvision AlexNet ImageNet weights (.pth)")
    parser.add_argument("--lin", required=True, help="the lpips package's weights/v0.1/alex.pth")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    import torch
    from safetensors.numpy import save_file

    files = {}
    for flag in ("alexnet", "lin"):
        path = getattr(args, flag)
        if not os.path.isfile(path):
            raise SystemExit(f"--{flag}={path}: no such file")
        files[flag] = torch.load(path, map_location="cpu", weights_only=True)
    save_file(convert(files["alexnet"], files["lin"]), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
