"""Let PyPI's CUDA torchvision import beside a CPU-only torch (CPU set-up path only).

PyPI ships torchvision for x86_64 linked against CUDA torch; beside torch+cpu its C++ ops fail to
load and `import torchvision` dies with "operator torchvision::nms does not exist" while it
registers fake kernels. regscale needs none of those ops (timm, diffusers and streaming import
torchvision for transforms), so before torchvision is first imported we declare the two op schemas
it registers fake kernels for. scripts/bootstrap.sh installs this module with a .pth hook into the
CPU virtual environment only; GPU clusters use a matching torchvision and never see it.
"""

import importlib.abc
import sys


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    _library = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            import torch

            lib = torch.library.Library("torchvision", "FRAGMENT")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
            _DeclareTorchvisionOps._library = lib
        return None


sys.meta_path.insert(0, _DeclareTorchvisionOps())
