"""Activation normalizers: one file per method, each a pure forward/backward pair and a layer."""

from refnorm.norms.base import CheckCase, Layer
from refnorm.norms.batch_norm import (
    BatchNorm,
    BatchNormCache,
    BatchNormGraphCache,
    batch_norm_backward,
    batch_norm_backward_graph,
    batch_norm_eval_forward,
    batch_norm_forward,
    batch_norm_forward_graph,
)
from refnorm.norms.group_norm import (
    GroupNorm,
    GroupNormCache,
    group_norm_backward,
    group_norm_forward,
)
from refnorm.norms.instance_norm import (
    InstanceNorm,
    InstanceNormCache,
    instance_norm_backward,
    instance_norm_eval_forward,
    instance_norm_forward,
)
from refnorm.norms.layer_norm import (
    LayerNorm,
    LayerNormCache,
    layer_norm_backward,
    layer_norm_forward,
)
from refnorm.norms.switchable_norm import (
    SwitchableNorm,
    SwitchableNormCache,
    SwitchableNormGrads,
    SwitchableOptions,
    switchable_norm_backward,
    switchable_norm_backward_compact,
    switchable_norm_eval_forward,
    switchable_norm_forward,
)

__all__ = [
    "BatchNorm",
    "BatchNormCache",
    "BatchNormGraphCache",
    "CheckCase",
    "GroupNorm",
    "GroupNormCache",
    "InstanceNorm",
    "InstanceNormCache",
    "Layer",
    "LayerNorm",
    "LayerNormCache",
    "SwitchableNorm",
    "SwitchableNormCache",
    "SwitchableNormGrads",
    "SwitchableOptions",
    "batch_norm_backward",
    "batch_norm_backward_graph",
    "batch_norm_eval_forward",
    "batch_norm_forward",
    "batch_norm_forward_graph",
    "group_norm_backward",
    "group_norm_forward",
    "instance_norm_backward",
    "instance_norm_eval_forward",
    "instance_norm_forward",
    "layer_norm_backward",
    "layer_norm_forward",
    "switchable_norm_backward",
    "switchable_norm_backward_compact",
    "switchable_norm_eval_forward",
    "switchable_norm_forward",
]
