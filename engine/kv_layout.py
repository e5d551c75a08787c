"""The KV-cache layout of an artifact, and the optimization profiles a static layout gets.

A concat artifact takes a growing past (`past_sequence` axis) and returns a longer present; the
GPU profile's context ranges size it. A static artifact (`kiln export --kv static`) takes
preallocated buffers `[slots, Hkv, max_context, D]` whose max_context is FIXED in the ONNX shape
(IKVCacheUpdateLayer needs a static sequence dimension: TensorRT-RTX docs, "KV cache update");
TensorScatter writes the new rows in place, so the present outputs alias the past inputs and
the runtime binds both to one device address. Only the slots (batch) and new tokens (sequence)
vary, so the GPU profile's context ranges do not apply; its max_context is the most positions
the profile was sized for (memory), and a static artifact longer than that is refused.

Every step of a slot engine runs all slots at once, with S = the most new tokens any slot takes
this step (1 when all decode, the prompt when one prefills), so each optimization profile must
accept B = slots: the engine's slot count is the smallest max_batch over the profiles.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from kiln.engine.errors import EngineBuildError, ProfileError
from kiln.engine.profiles import GpuProfile, ShapeRange
from kiln.errors import ArtifactError, ConfigError
from kiln.layouts import CONCAT, LAYOUTS, KVLayout, layout_named, layout_of_inputs
from kiln.manifests import OnnxManifests

log = logging.getLogger(__name__)


def layout_record(layout: dict[str, Any]) -> KVLayout:
    """The kiln/layouts.py record of a `kv_layout` result."""
    return layout_named(layout["layout"], where="kv_cache.layout")


def kv_layout(source: OnnxManifests, io: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """{"layout", "max_context"} from export.json's kv_cache, checked against the graph's I/O.

    A static graph has `write_index` and past buffers with a fixed sequence axis.
    """
    artifact, record = source.folder, source.export.kv_cache
    from_io = _layout_from_io(io)
    layout = record["layout"]
    if layout not in LAYOUTS or layout != from_io["layout"]:
        raise ArtifactError(
            f"{artifact}'s manifest says kv_cache.layout = {layout!r}, but model.onnx's inputs "
            f"are the {from_io['layout']} layout; the folder was edited by hand or mixed from "
            "two exports: rerun `kiln export` (and `kiln optimize`)."
        )
    if layout_record(from_io).has_slots and record["max_context"] != from_io["max_context"]:
        raise ArtifactError(
            f"{artifact}'s manifest says max_context = {record['max_context']}, but the "
            f"graph's KV buffers hold {from_io['max_context']} positions: rerun `kiln export`."
        )
    return from_io


def _layout_from_io(io: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    names = {v["name"]: v for v in io["inputs"]}
    past = [v for n, v in names.items() if n.startswith("past_key_values.")]
    try:
        layout = layout_of_inputs(list(names))
    except ConfigError:  # not a kiln graph: no cache to lay out; the op guard and parser judge it
        layout = CONCAT
    if not layout.has_slots:
        return {"layout": layout.name, "max_context": None}
    lengths = {v["shape"][2] for v in past}
    if len(lengths) != 1 or not all(isinstance(n, int) and n > 0 for n in lengths):
        raise ArtifactError(
            "model.onnx has a write_index input (static KV layout) but its past_key_values "
            f"sequence axes are {sorted(map(str, lengths))}, not one fixed length: the static "
            "layout needs [slots, Hkv, max_context, D] buffers; rerun `kiln export --kv static`."
        )
    return {"layout": layout.name, "max_context": lengths.pop()}


def static_shapes(gpu: GpuProfile, max_context: int) -> list[ShapeRange]:
    """The GPU profile's shape ranges for a static artifact of `max_context` positions.

    Rule: every profile's max_context must be >= the artifact's (else ProfileError); context
    ranges become the artifact's fixed length, sequences are clipped to it, and every profile's
    batch range is cut to the slot count (the smallest max_batch).
    """
    short = [s for s in gpu.shapes if s.max_context < max_context]
    if short:
        s = short[0]
        raise ProfileError(
            f"The static artifact's KV buffers hold max_context = {max_context} positions, but "
            f"GPU profile {gpu.name!r} [profile.{s.name}] max_context = {s.max_context} "
            f"({gpu.source or 'profile'}): the engine would need more KV memory than the profile "
            f"allows. Re-export with `kiln export --kv static --max-context {s.max_context}` (or "
            f"less), or raise max_context in the profile."
        )
    slots = min(s.max_batch for s in gpu.shapes)
    out = []
    for s in gpu.shapes:
        seq = min(s.max_sequence, max_context)
        out.append(
            replace(
                s,
                max_batch=slots,
                opt_batch=min(s.opt_batch, slots),
                max_sequence=seq,
                opt_sequence=min(s.opt_sequence, seq),
                max_context=max_context,
                opt_context=max_context,
            )
        )
    if any(s.max_batch > slots for s in gpu.shapes):
        log.info(
            "engine %s: static KV layout, %d slots (the smallest max_batch of %s: every step "
            "runs all slots), max_context %d fixed by the artifact",
            gpu.name,
            slots,
            ", ".join(s.name for s in gpu.shapes),
            max_context,
        )
    return out


def kv_updates(backend: Any, net: Any) -> dict[str, str]:
    """Map each present output to the past input its in-place KV_CACHE_UPDATE layer reads.

    Only such a layer (a network input as its cache, a network output as its result) updates the
    cache in place; anything between them (a Cast, a copy) would break the aliasing.
    """
    t = backend.trt
    pairs = {}
    for layer in net.layers():
        if layer.type != t.LayerType.KV_CACHE_UPDATE:
            continue
        cache, out = layer.get_input(0), layer.get_output(0)
        if cache is not None and cache.is_network_input and out.is_network_output:
            pairs[out.name] = cache.name
    return pairs


def check_kv_updates(
    layout: dict[str, Any], pairs: dict[str, str], io: dict[str, Any], where: str
) -> None:
    """A static graph must map every past buffer to its present by one in-place update.

    Otherwise present would be a copy, and binding it to past's address would corrupt the cache.
    """
    if not layout_record(layout).in_place:
        return
    want = {
        v["name"].replace("past_key_values.", "present.", 1): v["name"]
        for v in io["inputs"]
        if v["name"].startswith("past_key_values.")
    }
    if pairs != want:
        missing = sorted(set(want) - set(pairs)) or sorted(set(pairs) ^ set(want))
        raise EngineBuildError(
            f"{where} (static KV layout, {len(want)} past buffers) parsed to {len(pairs)} in-place "
            f"KV_CACHE_UPDATE layers (past input -> present output), not {len(want)}; not "
            f"in place: {', '.join(missing[:4])}. The TensorScatter writes must go straight from "
            "each past input to its present output: re-export with `kiln export --kv static`."
        )


def kv_record(
    layout: dict[str, Any], shapes: list[ShapeRange], pairs: dict[str, str]
) -> dict[str, Any]:
    """engine.json's kv_cache entry: what the runtime must allocate and bind."""
    record = layout_record(layout)
    if not record.in_place:
        return {"layout": record.name, "present_aliases_past": False}
    return {
        "layout": record.name,
        "max_context": layout["max_context"],
        "slots": {"min": 1, "max": min(s.max_batch for s in shapes)},
        "new_tokens": {s.name: [1, s.max_sequence] for s in shapes},
        # IKVCacheUpdateLayer writes into the past input's memory: the runtime must bind each
        # present output to its past input's device address (TensorRT docs, IKVCacheUpdateLayer).
        "present_aliases_past": True,
        "aliases": dict(sorted(pairs.items())),
    }
