"""Build an ONNX graph with the real TensorRT-RTX, CPU-only, ahead of time for given SMs."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build(path: Path, sms: tuple[str, ...] = ("SM86", "SM89")) -> dict[str, Any]:
    """Parse and build; return ok, errors, layer types and plan size (one small shape profile)."""
    import tensorrt_rtx as trt

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    net = builder.create_network(0)  # RTX networks are always strongly typed
    parser = trt.OnnxParser(net, logger)
    if not parser.parse_from_file(str(path)):
        return {"ok": False, "errors": [str(parser.get_error(i)) for i in range(parser.num_errors)]}
    cfg = builder.create_builder_config()
    cfg.num_compute_capabilities = len(sms)
    for i, sm in enumerate(sms):
        cfg.set_compute_capability(getattr(trt.ComputeCapability, sm), i)
    prof = builder.create_optimization_profile()
    for i in range(net.num_inputs):
        t = net.get_input(i)
        if t.name in ("input_ids", "position_ids"):
            prof.set_shape(t.name, (1, 1), (1, 16), (2, 64))
        elif t.name == "attention_mask":
            prof.set_shape(t.name, (1, 1), (1, 32), (2, 128))
        else:
            h, d = t.shape[1], t.shape[3]
            prof.set_shape(t.name, (1, h, 0, d), (1, h, 16, d), (2, h, 64, d))
    cfg.add_optimization_profile(prof)
    types: dict[str, int] = {}
    for i in range(net.num_layers):
        k = str(net.get_layer(i).type).split(".")[-1]
        types[k] = types.get(k, 0) + 1
    plan = builder.build_serialized_network(net, cfg)
    return {
        "ok": plan is not None,
        "errors": [] if plan is not None else ["build_serialized_network returned None"],
        "types": types,
        "bytes": plan.nbytes if plan is not None else 0,
        "header": bytes(plan)[:4] if plan is not None else b"",
    }
