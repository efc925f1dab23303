"""NVIDIA `trtexec`: the command lines that build and time an engine, and a parser for its performance summary.

Standard library only: this file is copied onto the Jetson beside the runner, so it imports nothing from the
project. Python 3.8 or newer (JetPack 5 and 6).

The summary has had three shapes, all read here (`layout` in the result names the one found):

- "trt7": TensorRT 7.x prints blocks: a `Host Latency` header, then `min: X ms (end to end Y ms)` lines and
  `percentile: X ms at 99%`, then (7.1 on) an `Enqueue Time` block without a mean, and a `GPU Compute` block.
- "trt8": TensorRT 8.0 to 8.4 print `=== Performance summary ===` and one line per metric,
  `Latency: min = X ms, max = ..., mean = ..., median = ..., percentile(99%) = ... ms`, with one percentile.
- "trt10": from TensorRT 8.5 on (and so in every 10.x) the same lines carry every percentile asked for,
  `percentile(90%) = ... ms, percentile(95%) = ... ms, percentile(99%) = ... ms` (the default since 8.5). The
  layout is told by its shape, so an 8.5/8.6 log that kept the default three percentiles reads as "trt10".
"""

from __future__ import annotations

import re

# trtexec's own names for the precisions. INT8 also enables FP16 so that TensorRT can give a layer with no INT8
# kernel (or no scale) an FP16 one instead of falling back to FP32.
PRECISION_FLAGS = {"int8": ("--int8", "--fp16"), "fp16": ("--fp16",), "fp32": ()}
# TensorRT 8.5 is the first whose trtexec takes a comma list for --percentile; older ones parse the option as one
# number, and given "90,95,99" they silently read 90 and report only that.
PERCENTILE_LIST_SINCE = (8, 5)
REPORTED_PERCENTILES = (90, 95, 99)
SINGLE_PERCENTILE = 99
OLDEST_SUPPORTED_MAJOR = 7

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)"
# "[06/12/2022-22:34:00] [I] message". Logs that passed through another tool or a paste can lack either part; the
# one space after the tag is all that is cut, since trtexec indents the second line of its advice.
_LOG_PREFIX = re.compile(r"^\s*(?:\[\d\d/\d\d/\d{4}-\d\d:\d\d:\d\d\] ?)?(?:\[(?P<severity>[A-Z])\] ?)?")
_SUMMARY_HEADER = "=== Performance summary ==="
_SUMMARY_METRIC = re.compile(
    r"^(?P<label>Latency|End-to-End Host Latency|Enqueue Time|H2D Latency|GPU Compute Time|D2H Latency):"
    r"\s*(?P<stats>min = .*)$")
_SUMMARY_STAT = re.compile(rf"(?P<name>min|max|mean|median|percentile\((?P<p>[\d.]+)%\)) = (?P<value>{_NUMBER}) ms")
_THROUGHPUT = re.compile(rf"^throughput: (?P<value>{_NUMBER}) qps$", re.IGNORECASE)
_LEGACY_BLOCK = {"host latency": "latency", "enqueue time": "enqueue", "gpu compute": "gpu_compute"}
_LEGACY_STAT = re.compile(rf"^(?P<name>min|max|mean|median): (?P<value>{_NUMBER}) ms\b")
_LEGACY_PERCENTILE = re.compile(rf"^percentile: (?P<value>{_NUMBER}) ms at (?P<p>[\d.]+)%")
_VERSION_DOTTED = re.compile(r"TensorRT version: (\d+\.\d+\.\d+)")
# TensorRT 8.0's trtexec printed the version as the packed integer, as does the "&&&& RUNNING ... [TensorRT v8502]"
# banner of every version since 8.0.
_VERSION_PACKED = re.compile(r"TensorRT version: (\d+)\s*$|\[TensorRT v(\d+)\]")
_BASE_STATS = ("min", "max", "mean", "median")


def parse_trtexec(text: str) -> dict:
    """The performance summary of a trtexec log, in milliseconds; ValueError when the log holds none.

    Returns trt_version ("8.5.2" or None), throughput_qps, latency_ms and gpu_compute_ms ({min, max, mean,
    median, p90, ...}; gpu_compute_ms may be None), h2d_ms, d2h_ms and enqueue_ms (means, or None), warnings
    (trtexec's own advice after the summary: throughput bound by enqueue or transfers, unstable GPU time, ...;
    plus a note here when a figure trtexec printed was dropped as meaningless) and layout ("trt7", "trt8" or "trt10"). When a log holds several summaries, the last one counts.

    Throughput is what trtexec prints: for an implicit-batch engine run with --batch=N it counts N images per
    query while the latencies are per query.
    """
    metrics: dict[str, dict] = {}
    legacy: dict[str, dict] = {}
    legacy_block = None
    throughput = None
    warnings: list[str] = []
    continuing_warning = False
    for raw_line in text.splitlines():
        prefix = _LOG_PREFIX.match(raw_line)
        severity, message = prefix["severity"], raw_line[prefix.end():]
        line = message.strip()
        if severity == "W" and continuing_warning and message.startswith("  ") and line:
            # trtexec prints each piece of advice as "* problem" and indents its suggestion on the next line.
            warnings[-1] = " ".join([warnings[-1], *line.split()])
            continue
        continuing_warning = severity == "W" and line.startswith("* ")
        if continuing_warning:
            warnings.append(" ".join(line[2:].split()))
            continue
        if line == _SUMMARY_HEADER:
            metrics, legacy, legacy_block, throughput, warnings = {}, {}, None, None, []
        elif match := _SUMMARY_METRIC.match(line):
            metrics[match["label"]] = _summary_stats(match["stats"])
        elif match := _THROUGHPUT.match(line):
            throughput = float(match["value"])
        elif line.lower() in _LEGACY_BLOCK:
            legacy_block = _LEGACY_BLOCK[line.lower()]
            legacy[legacy_block] = {}
        elif legacy_block and (match := _LEGACY_STAT.match(line)):
            legacy[legacy_block][match["name"]] = float(match["value"])
        elif legacy_block and (match := _LEGACY_PERCENTILE.match(line)):
            legacy[legacy_block][_percentile_key(match["p"])] = float(match["value"])

    latency = _complete(metrics.get("Latency"))
    if latency is not None:
        several_percentiles = sum(key.startswith("p") for key in latency) > 1
        layout = "trt10" if several_percentiles else "trt8"
        gpu_compute, enqueue = _complete(metrics.get("GPU Compute Time")), metrics.get("Enqueue Time", {})
        h2d, d2h = metrics.get("H2D Latency", {}).get("mean"), metrics.get("D2H Latency", {}).get("mean")
    else:
        latency = _complete(legacy.get("latency"))
        if latency is None:
            raise ValueError("no trtexec latency summary found (neither 'Latency: min = ... ms' nor TensorRT 7's "
                             "'Host Latency' block); is the log empty or cut short?")
        layout = "trt7"
        gpu_compute, enqueue = _complete(legacy.get("gpu_compute")), legacy.get("enqueue", {})
        h2d = d2h = None
        if throughput == 0:
            # TensorRT 7 multiplies by the implicit batch size, which is 0 for the explicit-batch engines every
            # ONNX model builds, so its "0 qps" measures nothing.
            throughput = None
            warnings.append("throughput not reported: TensorRT 7 printed 0 qps, as it does for explicit-batch "
                            "engines")
    return {
        "trt_version": parse_trt_version(text),
        "throughput_qps": throughput,
        "latency_ms": latency,
        "gpu_compute_ms": gpu_compute,
        "h2d_ms": h2d,
        "d2h_ms": d2h,
        "enqueue_ms": enqueue.get("mean"),
        "warnings": warnings,
        "layout": layout,
    }


def parse_trt_version(text: str) -> str | None:
    """The TensorRT version a trtexec log names ("8.5.2"), or None; unlike parse_trtexec it needs no summary,
    so it also reads a build log run with --skipInference."""
    for line in text.splitlines():
        if match := _VERSION_DOTTED.search(line):
            return match[1]
        if match := _VERSION_PACKED.search(line):
            return _unpack_version(int(match[1] or match[2]))
    return None


def trtexec_command(onnx: str, engine: str, precision: str, timing_cache: str, shapes: str | None = None,
                    dla_core: int | None = None, calib_cache: str | None = None,
                    extra: tuple[str, ...] = ()) -> list[str]:
    """The argument list (never a shell string) that builds `engine` from `onnx` with trtexec (TensorRT 8.0+,
    the first with --timingCacheFile).

    precision "int8" enables FP16 too, so layers TensorRT cannot run in INT8 fall back to FP16 rather than
    FP32. A DLA core gets --allowGPUFallback: layers DLA lacks then run on the GPU instead of failing the build
    (DLA has no FP32, so an fp32 build "on DLA" runs every layer on the GPU).
    calib_cache (--calib) is TensorRT 8.x's implicit INT8 from a calibration cache; `extra` is appended as is.
    """
    if precision not in PRECISION_FLAGS:
        raise ValueError(f"precision '{precision}' is not one of {', '.join(PRECISION_FLAGS)}")
    if calib_cache is not None and precision != "int8":
        raise ValueError(f"a calibration cache only means something for int8, not {precision}")
    if isinstance(extra, str):
        raise TypeError("extra must be a sequence of arguments, not one string")
    command = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}", f"--timingCacheFile={timing_cache}",
               *PRECISION_FLAGS[precision]]
    if shapes:
        command.append(f"--shapes={shapes}")
    if dla_core is not None:
        command += [f"--useDLACore={_checked_dla_core(dla_core)}", "--allowGPUFallback"]
    if calib_cache is not None:
        command.append(f"--calib={calib_cache}")
    return command + list(extra)


def trtexec_run_command(engine: str, iterations: int, warmup_ms: int, dla_core: int | None = None, *,
                        trt_major: int, trt_minor: int | None = None) -> list[str]:
    """The argument list that times a saved engine: `iterations` timed queries after `warmup_ms` of warm-up.

    --duration=0 makes the count exact: trtexec otherwise keeps running until its default 3 s have passed, so
    --iterations alone is only a minimum. Percentiles 90, 95 and 99 are asked for where trtexec takes a list
    (TensorRT 8.5 on); older ones, and a TensorRT 8 whose minor version is not given, get the 99th alone.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, not {iterations!r}")
    if isinstance(warmup_ms, bool) or not isinstance(warmup_ms, int) or warmup_ms < 0:
        raise ValueError(f"warmup_ms must be a non-negative integer, not {warmup_ms!r}")
    if isinstance(trt_major, bool) or not isinstance(trt_major, int) or trt_major < OLDEST_SUPPORTED_MAJOR:
        raise ValueError(f"TensorRT major version {trt_major!r} is not supported (7 or newer)")
    takes_list = (trt_major, trt_minor if trt_minor is not None else 0) >= PERCENTILE_LIST_SINCE
    percentiles = ",".join(map(str, REPORTED_PERCENTILES)) if takes_list else str(SINGLE_PERCENTILE)
    command = ["trtexec", f"--loadEngine={engine}", f"--iterations={iterations}", f"--warmUp={warmup_ms}",
               "--duration=0", f"--percentile={percentiles}"]
    if dla_core is not None:
        # The engine was built for DLA; the runtime still has to be told which core to run it on.
        command.append(f"--useDLACore={_checked_dla_core(dla_core)}")
    return command


def _summary_stats(stats: str) -> dict[str, float]:
    values = {}
    for match in _SUMMARY_STAT.finditer(stats):
        key = _percentile_key(match["p"]) if match["p"] else match["name"]
        values[key] = float(match["value"])
    return values


def _complete(stats: dict | None) -> dict | None:
    # A line cut off mid-way (a truncated log) must not pass for a summary.
    if stats is None or any(key not in stats for key in _BASE_STATS):
        return None
    return stats


def _percentile_key(percent: str) -> str:
    value = float(percent)
    return f"p{int(value)}" if value.is_integer() else f"p{value:g}"


def _unpack_version(packed: int) -> str:
    # TensorRT 10 packs major*10000 + minor*100 + patch; 8.x and 9.x packed major*1000 + minor*100 + patch.
    if packed >= 10000:
        return f"{packed // 10000}.{packed // 100 % 100}.{packed % 100}"
    return f"{packed // 1000}.{packed // 100 % 10}.{packed % 100}"


def _checked_dla_core(dla_core) -> int:
    if isinstance(dla_core, bool) or not isinstance(dla_core, int) or dla_core < 0:
        raise ValueError(f"dla_core must be a DLA core index (0, 1, ...), not {dla_core!r}")
    return dla_core
