"""Building the TensorRT engine in this process, where TensorRT and an NVIDIA GPU exist (a Jetson, a GPU host).

On machines without them (these development and CI machines: PyPI's TensorRT wheels cannot fetch their
libraries here) `unavailable()` says why and the engine is built on the device instead, from the bundle's
recipe. An engine is tied to the GPU and the TensorRT version that built it: both are recorded beside it.
"""

from __future__ import annotations

from pathlib import Path

INPUT_NAME = "images"


def unavailable() -> str | None:
    """None when an engine can be built here; otherwise the reason, in words a user can act on."""
    import importlib

    try:
        importlib.import_module("tensorrt")
    except Exception as exc:  # an absent package, or a stub whose native libraries are missing
        return f"TensorRT is not importable here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if not Path("/dev/nvidia0").exists() and not Path("/dev/nvhost-ctrl-gpu").exists():
        return "no NVIDIA GPU device on this machine"
    return None


def gpu_name() -> str:
    model = Path("/proc/device-tree/model")  # a Jetson names its module here
    if model.exists():
        return model.read_text(errors="replace").strip("\x00\n ")
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return "unknown NVIDIA GPU"


def build_engine(onnx_path: Path, engine_path: Path, precision: str, imgsz: int, timing_cache: Path,
                 dla_core: int | None = None, workspace_mb: int = 1024) -> dict:
    """Parses the ONNX (Q/DQ included), builds with INT8 + FP16 (INT8) or FP16, one fixed-shape optimization
    profile, a timing cache that later builds reuse, and a DLA core with GPU fallback on request."""
    import tensorrt as trt

    from edge_deploy.pipeline.errors import ConversionMismatch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Explicit batch is the only mode from TensorRT 10 on, where the flag is gone.
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if explicit is None else 1 << int(explicit))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConversionMismatch(f"TensorRT could not parse {Path(onnx_path).name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision in ("int8", "fp16"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # with Q/DQ in the graph: explicit quantization, no calibrator
    cache_bytes = Path(timing_cache).read_bytes() if Path(timing_cache).exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    shape = (1, 3, imgsz, imgsz)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, shape, shape, shape)
    config.add_optimization_profile(profile)
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConversionMismatch("TensorRT could not build an engine from the ONNX (see its log above)")
    Path(engine_path).write_bytes(bytes(serialized))
    Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__, "gpu": gpu_name(), "precision": precision, "dla_core": dla_core,
            "engine": Path(engine_path).name}
