"""RefineCAM: several layers' maps multiplied, so that an early layer's map keeps only what the
later layers confirm."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from heatlens.engine.maps import minmax
from heatlens.engine.targets import Target
from heatlens.explanation import Explanation
from heatlens.methods.registry import register
from heatlens.methods.wrapping import Wrapper


@register
class RefineCAM(Wrapper):
    """RefineCAM (pytorch-grad-cam 1.5.7, after arXiv 2605.14641): the maps of the method ``base``
    (Grad-CAM++ by default) at each layer ``l`` of ``layer=[...]``, each at the input's size and
    in [0, 1], ``M_l = minmax(upsample(relu(raw_l)))``, are multiplied and scaled again:
    ``M = minmax(prod_l M_l)``. A place survives only where every layer puts evidence, which
    removes the noise of early, high-resolution layers while keeping their detail.

    One pass of ``base`` gives every layer's raw map (pytorch-grad-cam runs ``base`` once per
    layer); with one layer the map is ``base``'s.
    """

    name = "refinecam"
    aliases = ("refine_cam",)
    default_base = "gradcam++"

    def _explain(self, x: Tensor, target: Target) -> Explanation:
        result = self.base(x, target)
        with torch.no_grad():
            per_layer = [self.base.postprocess({name: raw}, x)
                         for name, raw in result.raw_by_layer.items()]
            maps = minmax(torch.stack(per_layer).prod(dim=0))
        return dataclasses.replace(result, maps=maps, method=self.name)
