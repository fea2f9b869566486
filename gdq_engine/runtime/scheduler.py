"""Bit-grouped scheduling: patches of one bit-width run through the body as one batch."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .hostreads import to_host


def run_grouped(bits: torch.Tensor, feats: torch.Tensor, run: Callable[[torch.Tensor, int], torch.Tensor],
                streams=None, groups: list[tuple[int, torch.Tensor]] | None = None
                ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Run ``run(feats[idx], b)`` once per distinct bit-width ``b`` and scatter results back.

    Args:
        bits: (P,) int bit-width per patch.
        feats: (P, ...) per-patch inputs.
        run: the body at one bit-width; maps (p, ...) -> (p, ...).
        streams: a :class:`~gdq_engine.runtime.streams.GroupStreams` (CUDA): the groups run at the
            same time, each on its width's stream; None: one after another.
        groups: :func:`bit_groups` of ``bits`` on ``feats``' device, made before (an image graph
            makes them outside its capture, where an upload of host data could not be captured);
            None: made here.
    Returns:
        (outputs in the original patch order, [(bits, patch count), ...] in launch order).
    """
    if bits.shape[0] != feats.shape[0]:
        raise ValueError(f"{bits.shape[0]} bit assignments for {feats.shape[0]} patches")
    groups = list(bit_groups(bits, feats.device)) if groups is None else groups
    if len(groups) == 1:  # one group (e.g. a static policy): no gather, no scatter
        b, _ = groups[0]
        return run(feats, b), [(b, feats.shape[0])]
    inputs = [(b, feats[idx]) for b, idx in groups]
    outs = [run(x, b) for b, x in inputs] if streams is None else streams.run(inputs, run)
    out = outs[0].new_empty((feats.shape[0],) + tuple(outs[0].shape[1:]))
    for (_, idx), y in zip(groups, outs):
        out[idx.to(y.device)] = y
    return out, [(b, int(idx.numel())) for b, idx in groups]


def bit_groups(bits: torch.Tensor, device: torch.device):
    """(bit-width, indices on ``device`` of the patches that have it), for each distinct value of
    ``bits`` (P,), ascending: the unit of one batched body launch.

    One host read of ``bits`` (a CPU tensor costs no device sync); the indices are slices of one
    stable argsort made where ``bits`` lives, so no per-group ``nonzero`` sync."""
    values = bits.tolist()
    order = torch.argsort(bits, stable=True)
    if order.device.type == "cpu" and torch.device(device).type == "cuda":
        order = order.pin_memory().to(device, non_blocking=True)  # a pageable copy would sync the stream
    else:
        order = order.to(device)
    start = 0
    for b in sorted(set(values)):
        count = values.count(b)
        yield int(b), order[start:start + count]
        start += count


def forward_static(model, body, bits: int, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The quantized network with every patch at ``bits``: (P,3,h,w) float32 patches in [0,1] ->
    (P,3,sh,sw) float32. No policy call, no grouping and no host work, so a CUDA graph can capture
    it whole (the Engine does, for static policies). FP layers run in ``dtype``."""
    xn, feat = _head(model, x, dtype)
    # The integer body returns its residual stream's dtype (fp32, or dtype: IntegerBody.stream_dtypes);
    # FP layers run in dtype.
    out = model.forward_body(feat, run_blocks=lambda g: body(g, bits).to(g.dtype))
    return _output(model, out, xn)


def static_network(model, body, bits: int, x: torch.Tensor, dtype: torch.dtype = torch.float32,
                   graphs=None) -> torch.Tensor:
    """:func:`forward_static` of (P,3,h,w) float32 patches at ``bits``, as a replay of ``graphs``
    (a :class:`~gdq_engine.runtime.graphs.GraphCache`, keyed by the width on the exact batch: the
    static policy's whole-network graph) or, with None, eagerly."""
    if graphs is None:
        return forward_static(model, body, bits, x, dtype)
    return graphs(bits, x, lambda p: forward_static(model, body, bits, p, dtype), pad=False)


def policy_stage(model, policy, x: torch.Tensor, dtype: torch.dtype = torch.float32, graphs=None) -> torch.Tensor:
    """The FP head and ``policy``'s device stage (:meth:`~gdq_engine.policy.base.BitPolicy.device_stage`)
    of (P,3,h,w) float32 patches: the (P, ...) stage on their device, as one replay of ``graphs``
    (tagged ``("policy", id(policy))``, the id because an engine's policy may be swapped; keyed on
    the exact batch, as the head's cuDNN conv is in the network's graphs) or, with None, eagerly."""
    def stage(p: torch.Tensor) -> torch.Tensor:
        return policy.device_stage(p, _head(model, p, dtype)[1])

    return stage(x) if graphs is None else graphs(("policy", id(policy)), x, stage, pad=False)


def _head(model, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised patches, FP head features) of (P,3,h,w) float32 patches in [0,1], in ``dtype``."""
    xn = model.normalize(x.to(dtype))
    return xn, model.head(xn)


def _output(model, feat: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
    # The output glue (divide by the pixel range, add the mean) in fp32, in place on the
    # network's own output: in a half dtype it is less exact, and out of place its fresh
    # image-sized tensors cost several times the arithmetic on CPU (a page fault per 4 KiB).
    # A last conv on the backend's FP kernel does it in its epilogue (runtime/lastconv.py).
    from .lastconv import image_conv

    conv = image_conv(model)
    if conv is not None:
        return conv.image(model.upsampler(feat), model)
    return model.denormalize_(model.forward_output(feat, xn).float())


def has_device_stage(policy) -> bool:
    """Whether ``policy`` splits its assignment into a device stage and a host step
    (:meth:`~gdq_engine.policy.base.BitPolicy.device_stage`)."""
    from ..policy.base import BitPolicy

    return getattr(type(policy), "device_stage", BitPolicy.device_stage) is not BitPolicy.device_stage


def assign_bits(model, policy, x: torch.Tensor, dtype: torch.dtype = torch.float32, graphs=None):
    """A patch-wise policy's bit-widths for (P,3,h,w) float32 patches in [0,1].

    Returns ((P,) int64 bit-widths on the CPU, the normalised patches, the FP head features), the
    last two None when they stayed inside a graph. With ``graphs`` (a
    :class:`~gdq_engine.runtime.graphs.GraphCache` of its own, so that a stage which cannot be
    captured turns off only its graphs; the Engine passes one on CUDA only) and a policy that has
    a device stage (:func:`has_device_stage`), the FP head and the stage run as one graph replay
    keyed on the exact batch (the head's cuDNN conv, as in the network's graphs), then
    one host read of the stage's (P, ...) result, instead of dozens of eager launches (head, GBC
    descriptor, entropy) that the host issues while the GPU, which must finish them before the
    read, mostly waits. Otherwise the head runs eagerly and ``policy.assign`` decides."""
    if graphs is not None and has_device_stage(policy):
        return policy.assign_staged(x, to_host(policy_stage(model, policy, x, dtype, graphs))), None, None
    xn, feat = _head(model, x, dtype)
    return policy.assign(x, feat).cpu(), xn, feat


def forward_quantized(model, body, policy, x: torch.Tensor, dtype: torch.dtype = torch.float32, graphs=None,
                      policy_graphs=None, group_streams=None):
    """The quantized network on a batch of LR patches: FP head -> policy -> integer body -> FP tail.

    Args:
        model: the FP :class:`~gdq_engine.models.SRModel` (its layers in ``dtype``).
        body: an :class:`~gdq_engine.runtime.intgraph.IntegerBody`.
        policy: a patch-wise policy (``assign``: one bit-width per patch, patches grouped by it) or
            a layer-wise one (``layerwise = True``, e.g. CADyQ: regrouped before every conv).
        x: (P,3,h,w) float32 patches in [0,1].
        graphs: a :class:`~gdq_engine.runtime.graphs.GraphCache` (CUDA): a static policy's whole
            network, or a patch-wise policy's body-end conv, upsampler and tail (after the groups'
            integer blocks, which ``body`` may replay itself), then run as graph replays keyed on
            the exact batch size, so the FP convs see the batch sizes, and give the values, they do
            without graphs. A patch-wise policy that puts every patch of the batch at one width runs
            the static whole-network graph of that width.
        policy_graphs: another GraphCache (CUDA), for the FP head and a patch-wise policy's device
            stage (:func:`assign_bits`).
        group_streams: a :class:`~gdq_engine.runtime.streams.GroupStreams` (CUDA): a patch-wise
            policy's groups of different widths run their integer blocks at the same time.
    Returns:
        (y (P,3,sh,sw) float32, bits (P,) float32 mean activation bits per patch (on the CPU for
        patch-wise policies), groups: body launches as (bits, patches) for patch-wise or
        (layer, bits, patches) for layer-wise).
    """
    from ..policy.static import Static

    if isinstance(policy, Static):  # one bit-width: nothing to assign or group
        b = policy.bits[0]
        return static_network(model, body, b, x, dtype, graphs), torch.full((x.shape[0],), float(b)), [(b, x.shape[0])]
    if getattr(policy, "layerwise", False):
        from ..policy.cadyq import sobel_features

        xn, feat = _head(model, x, dtype)
        grads = sobel_features(x)
        seen = {}

        def blocks(g):
            out, layer_bits, groups = body.run_layerwise(g, policy, grads)
            seen.update(bits=layer_bits.float().mean(0), groups=groups)
            return out.to(g.dtype)

        out = model.forward_body(feat, run_blocks=blocks)
        bits, groups = seen["bits"], seen["groups"]
    else:
        # Bits on the host once: grouping needs them there, and the report reads them without
        # waiting for the body (a CPU tensor's .tolist() is no device sync).
        assigned, xn, feat = assign_bits(model, policy, x, dtype, policy_graphs)
        y, groups = forward_assigned(model, body, x, assigned, dtype, graphs, group_streams, head=(xn, feat))
        return y, assigned.float(), groups
    return _output(model, out, xn), bits, groups


def forward_assigned(model, body, x: torch.Tensor, assigned: torch.Tensor, dtype: torch.dtype = torch.float32,
                     graphs=None, group_streams=None, head: tuple | None = None,
                     groups: list[tuple[int, torch.Tensor]] | None = None) -> tuple[torch.Tensor, list]:
    """The quantized network on (P,3,h,w) float32 patches in [0,1] whose bit-widths are decided:
    ``assigned``, (P,) int64 on the CPU. Returns (y (P,3,sh,sw) float32, the body launches as
    [(bits, patches), ...], ascending bits).

    ``graphs``, ``group_streams``: as :func:`forward_quantized`'s. ``head``: (normalised patches,
    FP head features) where the policy computed them, else None (or (None, None)): computed
    here. ``groups``: :func:`bit_groups` of ``assigned`` on ``x``'s device, made before (None:
    made here); an image graph passes its own, made outside its capture."""
    xn, feat = head if head is not None else (None, None)
    if graphs is not None and bool((assigned == assigned[0]).all()):
        # Every patch at one width (the shipped Granular-DQ model put all 18 or 66 patches of
        # the 2026-11-26 latency frames at 4 bits): the static policy's whole-network graph,
        # keyed on the exact batch, one replay instead of a group body graph padded to its
        # bucket (18 -> 24, 66 -> 96 patches) and the tail's graph. The head runs once more
        # inside it (0.03 ms a 1080p frame); the values are the same.
        b = int(assigned[0])
        return static_network(model, body, b, x, dtype, graphs), [(b, x.shape[0])]
    if feat is None:  # the policy's graph computed the head features inside it
        xn, feat = _head(model, x, dtype)
    # Only the integer blocks run per group (the body returns its residual stream's dtype; FP
    # layers run in dtype); the body-end conv, the skip, the upsampler and the tail
    # run once on the whole batch: on CUDA one more replay, not an eager conv per group.
    blocks_out, launched = run_grouped(assigned, model.blocks_input(feat), lambda f, b: body(f, b).to(f.dtype),
                                       group_streams, groups)

    def after_blocks(blocks: torch.Tensor, head_feat: torch.Tensor, xg: torch.Tensor) -> torch.Tensor:
        return _output(model, model.close_body(blocks, head_feat), xg)

    if graphs is not None:
        return graphs("tail", (blocks_out, feat, xn), after_blocks, pad=False), launched
    return after_blocks(blocks_out, feat, xn), launched
