"""Activation normalizers: one file per method, each a pure forward/backward pair and a layer.

BN, IN, LN and GN: one decision, written down
---------------------------------------------
The four are one computation — statistics over some axes, standardize, scale and shift per
channel — and their files repeat each other's shape **on purpose**: each file reads alone
beside its paper. What they share is already shared, as functions each body calls by name
(:mod:`refnorm.core`: ``moments``, ``standardize`` and its closed-form backward,
``affine_forward``/``affine_backward``; :mod:`refnorm.norms.base`: the running statistics'
view, the upstream gradient's cast, the layer base). What each file spells out is exactly
what differs between the papers: its reduction axes (SN's ``I_k``: (0, 2, 3, ...) for BN,
(2, 3, ...) for IN, (1, 2, ...) for LN, GN's grouped view (N, G, C/G, ...)), its cache, its
inference (running statistics for BN and IN, none for LN and GN), its layer and its fast
variant. The four files have the same order: cache, forward (and BN's and IN's inference
forward), backward, layer, fast path; BN adds its staged backward before the layer.

The alternative, Flax's single ``channel_norm(x, axes)`` with four configurations, would save
the repeated lines; a student would then read an ``axes`` argument instead of the set of
values each paper normalizes over, and the lessons (01: BN node by node, 02: the four scopes
side by side) would point into one generic body. The repetition is guarded instead by tests
that hold the methods equal where the papers say they are: GN with G = 1 is LN, GN with
G = C is IN (``tests/norms/test_group_norm.py``), SN with one-hot ratios is BN, IN or LN
(``tests/norms/test_switchable_norm.py``).
"""

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
