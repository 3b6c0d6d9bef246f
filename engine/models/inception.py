"""pytorch-fid's InceptionV3 (the TF-ported FID network, pool3 2048-d), built from a weights
file on disk and never downloaded.

pytorch-fid's `InceptionV3(use_fid_inception=True)` builds its network with `fid_inception_v3()`,
which fetches the weights with `load_state_dict_from_url`. Here the same structure (torchvision's
Inception3 with 1008 classes and no aux head, nine blocks swapped for pytorch-fid's
`FIDInception*` blocks) is built with random weights, the state dict is loaded with
`torch.load(weights_only=True)`, and pytorch-fid's own `InceptionV3` wraps it (its constructor
is pointed at this builder), so the forward pass, including its preprocessing (bilinear resize
to 299x299, [0, 1] -> [-1, 1]), is pytorch-fid's code.

The weights file is `pt_inception-2015-12-05-6726825d.pth`, looked up where pytorch-fid looks:
`torch.hub.get_dir()/checkpoints/` (which follows $TORCH_HOME), or any file given explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048
# (attribute of Inception3, pytorch-fid block class, constructor arguments), as pytorch-fid swaps them
FID_BLOCKS = (
    ("Mixed_5b", "FIDInceptionA", (192, 32)),
    ("Mixed_5c", "FIDInceptionA", (256, 64)),
    ("Mixed_5d", "FIDInceptionA", (288, 64)),
    ("Mixed_6b", "FIDInceptionC", (768, 128)),
    ("Mixed_6c", "FIDInceptionC", (768, 160)),
    ("Mixed_6d", "FIDInceptionC", (768, 160)),
    ("Mixed_6e", "FIDInceptionC", (768, 192)),
    ("Mixed_7b", "FIDInceptionE_1", (1280,)),
    ("Mixed_7c", "FIDInceptionE_2", (2048,)),
)


class InceptionWeightsMissing(FileNotFoundError):
    pass


def torch_hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, else
    $XDG_CACHE_HOME/torch/hub, else ~/.cache/torch/hub (torch's own rule)."""
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]).expanduser() / "hub"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "torch" / "hub"


def default_weights_path(hub_dir: Path | None = None) -> Path:
    return (hub_dir or torch_hub_dir()) / "checkpoints" / WEIGHTS_NAME


def missing_weights_message(path: Path, explicit: bool) -> str:
    if explicit:
        return f"inception_weights file {path} does not exist"
    return (f"Inception weights not found: put pytorch-fid's {WEIGHTS_NAME} at {path} "
            f"(under $TORCH_HOME/hub/checkpoints/), or set inception_weights = \"<file>\"; nothing is downloaded")


def resolve_weights(weights: str | Path | None) -> Path:
    """The weights file to use: the explicit one, or pytorch-fid's default location (using
    torch.hub.get_dir(), so torch.hub.set_dir() is respected too). Raises if it is missing."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise InceptionWeightsMissing(missing_weights_message(path, explicit=True))
        return path
    import torch

    path = default_weights_path(Path(torch.hub.get_dir()))
    if not path.is_file():
        raise InceptionWeightsMissing(missing_weights_message(path, explicit=False))
    return path


def fid_inception_structure():
    """pytorch-fid's FID Inception network with random weights (the layout of its weights file)."""
    from pytorch_fid import inception as pf

    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    for name, block, args in FID_BLOCKS:
        setattr(net, name, getattr(pf, block)(*args))
    return net


def load_fid_inception(weights: str | Path | None = None, device=None):
    """pytorch-fid's `InceptionV3([3])` (pool3, resize and normalise on) with weights from disk."""
    import torch
    from pytorch_fid import inception as pf

    path = resolve_weights(weights)
    net = fid_inception_structure()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as exc:  # unpickling errors, missing or mismatched keys
        raise ValueError(f"{path}: not pytorch-fid's Inception weights ({type(exc).__name__}: {exc})") from None
    with mock.patch.object(pf, "fid_inception_v3", lambda: net):
        model = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]], resize_input=True,
                               normalize_input=True)
    return model.to(device or torch.device("cpu")).eval()


def write_random_weights(path: str | Path, seed: int = 0) -> Path:
    """A weights file in pytorch-fid's layout with random weights (about 92 MB), for tests.
    Convolutions get He-normal weights, so activations keep their scale through the ~90 layers
    and the features are of order 0.1-1 rather than vanishingly small."""
    import torch

    torch.manual_seed(seed)
    net = fid_inception_structure()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
