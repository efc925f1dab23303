"""The build report: one self-contained HTML page (`report.html`) and a Markdown summary (`report.md`).

Both are rendered from one list of sections (paragraphs, tables, charts), so the two files carry the same numbers;
the Markdown has the tables and leaves the charts out. They are pure functions of what the release stage hands
them: no clock, no randomness, fixed float formats and hand-written SVG (a plotting library would stamp dates and
random ids into its output), so the same inputs give the same bytes and the manifest's hashes of the files stay
stable. The page needs nothing but itself: no script, no stylesheet or font from elsewhere, nothing fetched.

A figure that was not measured is said in words and never drawn as 0.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass

from edge_deploy.pipeline.results import FP32_ONNX, NEAR_TIE_SCORE, UNSURE_FRACTION, UNSURE_NMS_MARGIN, Accuracy, \
    AccuracyReport, ModelInfo, ProbeResult, QuantizationReport, SpeedReport

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
GREY = "#9e9e9e"
# Sensitivity charts show the units that hurt most; every unit is in the table below the chart.
SENSITIVITY_SHOWN = 40


@dataclass(frozen=True)
class ReportInputs:
    name: str
    info: ModelInfo
    config: dict
    calibration: dict | None
    toolchain: dict
    verify: AccuracyReport
    probe: SpeedReport | None
    quantization: QuantizationReport | None = None
    # The FP32 model on the selection split: what the quantization candidates' drops are measured against.
    selection_reference: Accuracy | None = None
    pruning: dict | None = None
    # The engine's record of the build that made the bundle: stage, started, seconds, cache_hit, work_seconds.
    timeline: tuple = ()


@dataclass(frozen=True)
class Table:
    headers: tuple
    rows: tuple


@dataclass(frozen=True)
class Section:
    anchor: str
    title: str
    blocks: tuple  # str (a paragraph), Table, or Chart


@dataclass(frozen=True)
class Chart:
    svg: str
    caption: str


def render_html(inputs: ReportInputs) -> str:
    sections = build_sections(inputs)
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{_esc(inputs.name)}: build report</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
           f"<h1>{_esc(inputs.name)}: build report</h1>", '<nav><ul>']
    out += [f'<li><a href="#{s.anchor}">{_esc(s.title)}</a></li>' for s in sections]
    out.append("</ul></nav>")
    out += [_html_section(section) for section in sections]
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def _html_section(section: Section) -> str:
    out = [f'<section id="{section.anchor}"><h2>{_esc(section.title)}</h2>']
    for block in section.blocks:
        if isinstance(block, str):
            out.append(f"<p>{_inline(block)}</p>")
        elif isinstance(block, Chart):
            out.append(f"<figure>{block.svg}<figcaption>{_inline(block.caption)}</figcaption></figure>")
        else:
            out.append(_html_table(block))
    out.append("</section>")
    return "\n".join(out)


def render_markdown(inputs: ReportInputs) -> str:
    sections = build_sections(inputs)
    out = [f"# {inputs.name}: build report", "",
           "The same numbers as `report.html`, which also draws them (timeline, latency distributions, pruning "
           "history, quantization sensitivity, latency against mAP50-95).", ""]
    for section in sections:
        out += _md_section(section)
    return "\n".join(out)


def _md_section(section: Section) -> list[str]:
    out = [f"## {section.title}", ""]
    for block in section.blocks:
        if isinstance(block, str):
            out += [_md_text(block), ""]
        elif isinstance(block, Table):
            out += [_md_row(block.headers), "|" + "---|" * len(block.headers)]
            out += [_md_row(row) for row in block.rows]
            out.append("")
    return out


def add_search_section(page: str, markdown: str, search: dict) -> tuple[str, str]:
    """A released report with the section of the search that picked its bundle (a manifest's `search`) added
    last. The release stage renders the build alone, before any search has chosen it."""
    section = search_section(search["plot"])
    nav_end, body_end = page.index("</ul></nav>"), page.rindex("</body>")
    page = (page[:nav_end] + f'<li><a href="#{section.anchor}">{_esc(section.title)}</a></li>'
            + page[nav_end:body_end] + _html_section(section) + "\n" + page[body_end:])
    return page, markdown.rstrip("\n") + "\n\n" + "\n".join(_md_section(section))


def search_section(plot: dict) -> Section:
    """The search a bundle was picked by: every trial, its front, the baseline and the pick, from the record
    `search.plot_record` makes."""
    chosen = plot["chosen"]
    blocks = [f"This bundle is {_chosen_text(chosen)} of a search over {plot['trials']} trials: each trial an "
              "ordinary build with a few settings changed, compared on latency against mAP50-95. "
              + search_caption(plot)]
    rows = tuple((p["label"], f"{p['map50_95']:.4f}", f"{p['drop_points']:.2f}" if p["drop_points"] is not None
                  else "not recorded", _f(p["p50_ms"]) + (" (busy)" if p["busy"] else ""),
                  "yes" if p["front"] else "no",
                  "baseline" if p["key"] == plot["baseline"]["key"] else
                  "picked" if chosen and p["key"] == chosen["key"] else "")
                 for p in sorted(plot["points"], key=lambda p: (p["p50_ms"], -p["map50_95"])))
    blocks += [Chart(search_svg(plot), "p50 latency (ms) against mAP50-95 on the selection split, one point per "
                                       "timed trial; the line joins the Pareto front."),
               Table(("trial", "mAP50-95 (selection)", "drop (pts)", "p50 ms", "on the front", "mark"), rows)]
    return Section("search", "Search: latency against mAP50-95 of every trial", tuple(blocks))


def _chosen_text(chosen: dict | None) -> str:
    if chosen is None:
        return "not the choice"
    return f"the trial {chosen['label']} ({chosen['how']})"


def search_caption(plot: dict) -> str:
    drawn, selection = len(plot["points"]), plot["selection"]
    split = (f"the selection split ({selection['images']} images from `{selection['source']}`)" if selection
             else "the selection split")
    left = [f"{plot['failed']} failed"] + ([f"{plot['not_timed']} not timed"] if plot["not_timed"] else [])
    chosen = plot["chosen"]
    text = (f"{drawn} of {plot['trials']} trials drawn ({', '.join(left)}: not drawn). Latency: the p50 each trial's "
            f"probe measured on {'; '.join(plot['timed_on']) or 'no device'}"
            + (", so the points are not directly comparable" if len(plot["timed_on"]) > 1 else "")
            + f". mAP50-95: on {split}, where the search chooses; the report split is never chosen on. "
            f"Square: the baseline ({plot['baseline']['label']}). ")
    if chosen is not None:
        text += f"Ring: {chosen['how']} ({chosen['label']}, {chosen['drop_points']:.2f} points). "
    busy = sum(p["busy"] for p in plot["points"])
    if busy:
        text += f"{busy} of the timings saw a busy machine (marked busy in the table). "
    return text + (f"Dashed line: the budget, {plot['max_map_drop']:.2f} points of mAP50-95 below the baseline.")


def build_sections(r: ReportInputs) -> list[Section]:
    return [_identity(r), _timeline(r), _accuracy(r), _latency(r), _pruning(r), _sensitivity(r), _pareto(r)]


# --- sections -------------------------------------------------------------------------------------------------

def _identity(r: ReportInputs) -> Section:
    info, config = r.info, r.config
    rows = [
        ("model", f"{info.family} from `{info.source}`, {info.params:,} parameters"
                  f"{' (pruned)' if info.pruned else ''}"),
        ("classes", f"{len(info.names)}: {', '.join(info.names)}"),
        ("input", f"{info.imgsz}x{info.imgsz} RGB, letterboxed, scaled 1/255"),
        ("target", config["target"]),
        ("precision", str(config["precision"]).upper()),
        ("profile", config.get("profile") or "none"),
    ]
    if r.calibration:
        rows.append(("calibration", f"{r.calibration['images']} images from `{r.calibration['source']}` "
                                    f"(fingerprint {r.calibration['fingerprint'][:16]})"))
    else:
        rows.append(("calibration", "none (not a calibrated precision)"))
    if r.quantization is not None:
        rows.append(("selection split", _split_text(r.quantization.selection)))
    rows.append(("report split", _split_text(r.verify.split)))
    rows += [(f"version: {name}", version) for name, version in sorted(r.toolchain.items())]
    return Section("build", "Build", (Table(("item", "value"), tuple(rows)),))


def _timeline(r: ReportInputs) -> Section:
    if not r.timeline:
        return Section("timeline", "Stage timeline", (
            "Not recorded: this bundle was released outside a build's engine, which is what times the stages.",))
    origin = min(e["started"] for e in r.timeline)
    rows = []
    for e in r.timeline:
        work = e.get("work_seconds")
        rows.append((e["stage"], f"{e['started'] - origin:.2f}", f"{e['seconds']:.2f}",
                     "hit" if e["cache_hit"] else "ran",
                     "not recorded" if work is None else f"{work:.2f}"))
    text = ("How the build that made this bundle went: when each stage started (seconds after the first), how "
            "long it took in that build, and whether it ran or reused a cached result (a cache hit; the last "
            "column is how long its work took when it did run). `release`, which writes this report, is not in "
            "it. An unchanged later build reuses this bundle and this report as they are.")
    total = max(e["started"] - origin + e["seconds"] for e in r.timeline)
    chart = Chart(_timeline_svg(r.timeline, origin),
                  f"Stage timeline: {len(r.timeline)} stages over {total:.2f} s; dark bars ran, light bars were "
                  "cache hits.")
    return Section("timeline", "Stage timeline", (text, chart, Table(
        ("stage", "start s", "duration s", "cache", "work when it ran s"), tuple(rows))))


def _accuracy(r: ReportInputs) -> Section:
    v = r.verify
    fidelity = v.reference.kind == "fidelity"
    measure = "fidelity mAP" if fidelity else "accuracy mAP"
    blocks = []
    if fidelity:
        blocks.append("No labels were given: these are fidelity figures, not accuracy. Each model's detections are "
                      "scored (COCO mAP by pycocotools) against the FP32 model's own confident detections on the "
                      "same images, so FP32 scores itself; its detections scored just under the confidence (from "
                      f"{UNSURE_FRACTION:g} of it), and those NMS keeps or drops only within {UNSURE_NMS_MARGIN:g} "
                      f"of its IoU, are neither required nor counted wrong; {near_tie_rule(v.artifact)}. "
                      "`found again` is the share of "
                      "the confident boxes the model finds again at the same confidence (same class, IoU at least "
                      "0.5), with how far the found boxes' sides are from FP32's on average, in image pixels.")
    else:
        blocks.append("Accuracy: COCO mAP by pycocotools against the labels. The final artifact and the FP32 "
                      "reference are scored on the report split, which no choice of the build has seen"
                      + ("; the quantization candidates were scored on the selection split, where the choice was "
                         "made." if r.quantization is not None else "."))
    blocks.append("Where the figures were computed: each model in its own runtime on the build machine (the "
                  "target's runtime, or its emulation), not on the device.")
    rows, bars = [], []
    report_split = f"report ({v.split.images} images)"
    rows.append(("FP32 ONNX (ONNX Runtime)", report_split, measure, f"{v.reference.map50:.4f}",
                 f"{v.reference.map50_95:.4f}", _ci(v.reference.map50_95_interval, ".4f"), "0.00 (the reference)",
                 "", _found(v.reference)))
    if v.original is not None:
        below = (v.original.map50_95 - v.reference.map50_95) * 100
        rows.append(("original model, before pruning (FP32 ONNX)", report_split, measure,
                     f"{v.original.map50:.4f}", f"{v.original.map50_95:.4f}", _ci(v.original.map50_95_interval, ".4f"),
                     f"not applicable (the pruned FP32 model is {below:.2f} below it)", "", _found(v.original)))
    q = r.quantization
    if q is not None:
        selection_split = f"selection ({q.selection.images} images)"
        ref = r.selection_reference
        if ref is not None:
            rows.append(("FP32 ONNX (ONNX Runtime)", selection_split, measure, f"{ref.map50:.4f}",
                         f"{ref.map50_95:.4f}", _ci(ref.map50_95_interval, ".4f"), "0.00 (the reference)", "",
                         _found(ref)))
        for i, trial in enumerate(q.trials, 1):
            label = _candidate_label(q, i, trial)
            drop = trial["drop_points"]
            derived = (f"{ref.map50_95 - drop / 100:.4f} (FP32 minus the drop)" if ref is not None
                       else "not recorded")
            rows.append((label, selection_split, measure, "not recorded", derived, "", f"{drop:.2f}",
                         _ci(trial.get("drop_interval"), ".2f"), "not recorded"))
            bars.append((label, drop, "selection"))
    if v.artifact is not None:
        rows.append((f"{v.artifact_label} (final)", report_split, measure, f"{v.artifact.map50:.4f}",
                     f"{v.artifact.map50_95:.4f}", _ci(v.artifact.map50_95_interval, ".4f"), f"{v.drop_points:.2f}",
                     _ci(v.drop_interval, ".2f"), _found(v.artifact)))
        bars.append((f"{v.artifact_label} (final)", v.drop_points, "report"))
        if v.fidelity is not None:
            rows.append((f"{v.artifact_label} (final)", report_split, "fidelity mAP", f"{v.fidelity.map50:.4f}",
                         f"{v.fidelity.map50_95:.4f}", _ci(v.fidelity.map50_95_interval, ".4f"), "not applicable", "",
                         _found(v.fidelity)))
    else:
        blocks.append("The artifact is the FP32 ONNX model itself: its figures are the reference's.")
    budget = f"Budget: {v.budget_points:.2f} points of mAP50-95 below FP32 ({'met' if v.within_budget else 'missed'}"
    budget += " on the report split)."
    if v.total_drop_points is not None:
        interval = _ci(v.total_drop_interval, ".2f")
        budget += (f" Against the original model before pruning: {v.total_drop_points:.2f} points lost in all"
                   f"{' (95% interval ' + interval + ')' if interval else ''} (budget {v.total_budget_points:.2f}).")
    if v.drop_interval is not None:
        drawing = (v.bootstrap or {}).get("drawing_an_object")
        budget += (f" Intervals: 95%, from a paired bootstrap over the {v.split.images} report images "
                   "(over the selection images for candidates)"
                   f"{f'; {drawing} of its resamples draw an object, the others have no mAP' if drawing else ''}.")
    for flag in v.flags:
        budget += f" Warning: {flag['message']}"
    blocks += [budget, Table(("model", "split", "measure", "mAP50", "mAP50-95", "mAP50-95 interval",
                              "drop vs FP32 (points)", "drop interval", "found again"), tuple(rows))]
    if bars:
        blocks.append(Chart(_drop_svg(bars, v.budget_points),
                            "mAP50-95 drop against the FP32 model on the same split, in points (dashed: the "
                            "budget). Candidates on the selection split, the final artifact on the report split."))
    return Section("accuracy", "Accuracy per artifact", tuple(blocks))


def _latency(r: ReportInputs) -> Section:
    p = r.probe
    if p is None:
        return Section("latency", "Latency", (
            f"Not measured: the `{r.config['target']}` artifact becomes runnable only on its device, where its "
            "engine is built; a timing taken on the build machine would describe another machine. Run "
            "`deploy bench BUNDLE --device NAME` on the device.",))
    blocks = ["Model inference only, batch 1, warm runs after warm-up, each on the device named in its row."]
    if p.contended:
        blocks.append(f"Warning: {p.contended}")
    results = _probe_rows(p)
    rows = []
    for label, res in results:
        lat = res.latency_ms
        rows.append((label, res.runtime, *(_num(lat.get(k)) for k in ("p50", "p90", "p99", "mean", "min", "max")),
                     _num(res.fps), _num(res.load_ms), _num(res.memory_mb.get("peak_rss")), res.power_text(),
                     str(len(res.samples_ms)) if res.samples_ms else f"{res.runs} (samples not reported)",
                     device_text(res.device)))
    blocks.append(Table(("model", "runtime", "p50 ms", "p90 ms", "p99 ms", "mean ms", "min ms", "max ms", "FPS",
                         "load ms", "peak RSS MB", "power", "runs", "device"), tuple(rows)))
    if p.speedup_p50 is not None:
        blocks.append(f"{p.speedup_text()}; both on the same device.")
    sampled = [(label, res) for label, res in results if res.samples_ms]
    if sampled:
        low = min(min(res.samples_ms) for _, res in sampled)
        high = max(max(res.samples_ms) for _, res in sampled)
        for i, (label, res) in enumerate(sampled):
            blocks.append(Chart(_histogram_svg(res, low, high, PALETTE[i % len(PALETTE)]),
                                f"{label}: {len(res.samples_ms)} warm runs on {device_text(res.device)}; lines at "
                                f"p50 {_num(res.latency_ms.get('p50'))}, p90 {_num(res.latency_ms.get('p90'))}, "
                                f"p99 {_num(res.latency_ms.get('p99'))} ms."))
    for label, res in results:
        if not res.samples_ms:
            blocks.append(f"{label}: the runtime reported no per-run samples, so no distribution is drawn.")
    return Section("latency", "Latency", tuple(blocks))


def _pruning(r: ReportInputs) -> Section:
    if not r.pruning:
        return Section("pruning", "Pruning history", ("Not pruned: this build kept every channel.",))
    steps = r.pruning["steps"]
    rows = tuple((str(s["step"]), f"{s['params']:,}", f"{s['macs']:,}", f"{s['macs_ratio']}x",
                  _num(s.get("latency_ms")), f"{s['map50_95']:.4f}",
                  f"{s['map50']:.4f}" if s.get("map50") is not None else "not recorded",
                  "yes" if s["fine_tuned"] else "no", "yes" if s.get("kept", True) else "no") for s in steps)
    text = (f"Structured channel pruning ({r.pruning['criterion']}), {r.pruning['stop']}. Each step is measured "
            "after its fine-tuning on the build machine: ONNX Runtime CPU p50 latency at 1 thread, mAP on the "
            "selection split.")
    charts = (Chart(_line_svg([s["step"] for s in steps], [s["map50_95"] for s in steps], "pruning step",
                              "mAP50-95 (selection split)", PALETTE[0], 4),
                    "mAP50-95 on the selection split after each pruning step."),
              Chart(_line_svg([s["step"] for s in steps], [s["latency_ms"] for s in steps], "pruning step",
                              "p50 ms (ORT CPU, 1 thread)", PALETTE[1], 3),
                    "ONNX Runtime CPU p50 latency (1 thread, build machine) after each pruning step."))
    return Section("pruning", "Pruning history", (text, *charts, Table(
        ("step", "params", "MACs", "MACs ratio", "p50 ms", "mAP50-95", "mAP50", "fine-tuned", "kept"), rows)))


def _sensitivity(r: ReportInputs) -> Section:
    q = r.quantization
    title = "Quantization sensitivity"
    if q is None:
        return Section("sensitivity", title, (
            f"Not quantized: {str(r.config['precision']).upper()} needs no calibration, so nothing was searched.",))
    if not q.sensitivity:
        return Section("sensitivity", title, (
            f"Not computed: units are ranked only when no range method alone meets the budget. Here: {q.choice}.",))
    kept = set(q.float_units)
    rows = tuple((str(i), s["unit"], s["kind"], _db(s["sqnr_db"]), "yes" if s["unit"] in kept else "no")
                 for i, s in enumerate(q.sensitivity, 1))
    text = (f"{q.ranked_by or f'Each {q.unit_kind} quantized alone, scored by an SQNR'}: lower hurts more. "
            f"{len(q.float_units)} of {q.units} {q.unit_kind}s were kept float to meet the budget.")
    shown = q.sensitivity[:SENSITIVITY_SHOWN]
    caption = (f"The {len(shown)} most sensitive of {len(q.sensitivity)} {q.unit_kind}s (red: kept float); "
               "every one is in the table.")
    return Section("sensitivity", title, (text, Chart(_sensitivity_svg(shown, kept), caption), Table(
        ("rank", q.unit_kind, "kind", "output SQNR dB", "kept float"), rows)))


def _pareto(r: ReportInputs) -> Section:
    title = "Latency against mAP50-95"
    v, p = r.verify, r.probe
    kind = "fidelity " if v.reference.kind == "fidelity" else ""
    left_out = []
    if v.original is not None:
        left_out.append("the original model before pruning (its mAP is above; it was not timed)")
    if r.quantization is not None and r.quantization.trials:
        left_out.append("the quantization candidates (scored on the selection split, never timed)")
    points = []
    if p is not None:
        # A target's own FP32 build was timed, not scored: its point takes the FP32 ONNX's mAP, and says so.
        label = FP32_ONNX if p.reference_label == FP32_ONNX else f"{p.reference_label} (the FP32 ONNX's mAP)"
        points.append((label + (" (the artifact itself)" if v.artifact is None else ""), p.reference, v.reference))
        if v.artifact is not None and p.artifact is not None:
            points.append((v.artifact_label, p.artifact, v.artifact))
    points = [(label, res, acc) for label, res, acc in points if res.latency_ms.get("p50") is not None]
    if not points:
        reason = ("no latency was measured for this build (its engine is built and timed on the device)" if p is None
                  else "the runtime reported no p50")
        return Section("pareto", title, (f"Not drawn: {reason}. Only artifacts with both a measured latency and "
                                         "an mAP50-95 on the report split are compared here.",))
    frontier = _frontier([(res.latency_ms["p50"], acc.map50_95) for _, res, acc in points])
    rows = tuple((label, _num(res.latency_ms["p50"]), f"{acc.map50_95:.4f}", device_text(res.device),
                  "yes" if i in frontier else "no") for i, (label, res, acc) in enumerate(points))
    blocks = [f"Each artifact with both a measured p50 latency and a {kind}mAP50-95 on the report split; the "
              "Pareto frontier (nothing else is both faster and more accurate) is joined by a line."]
    if len({device_text(res.device) for _, res, _ in points}) > 1:
        blocks.append("The points were timed on different devices (named in the table): their latencies are not "
                      "directly comparable.")
    if left_out:
        blocks.append("Not on the plot: " + "; ".join(left_out) + ".")
    blocks += [Chart(_pareto_svg(points, frontier, f"{kind}mAP50-95 (report split)"),
                     "p50 latency (ms) against mAP50-95; labels name each artifact."),
               Table(("model", "p50 ms", f"{kind}mAP50-95", "device", "on the frontier"), rows)]
    return Section("pareto", title, tuple(blocks))


# --- helpers --------------------------------------------------------------------------------------------------

def device_text(device: dict) -> str:
    transport = device.get("transport", {})
    parts = [f"{device.get('processor') or 'unknown processor'} ({device.get('cpus', '?')} CPUs, "
             f"{device.get('machine', '?')})"]
    if device.get("os"):
        parts.append(str(device["os"]))
    where = f"via {transport.get('transport', '?')}"
    if transport.get("device"):
        where = f"device {transport['device']} {where}"
    parts.append(where)
    return ", ".join(parts)


def _probe_rows(p: SpeedReport) -> list[tuple[str, ProbeResult]]:
    rows = [(p.reference_label, p.reference)]
    if p.artifact is not None:
        rows.append((p.artifact_label, p.artifact))
    return rows


def _candidate_label(q: QuantizationReport, index: int, trial: dict) -> str:
    floats = len(trial["float_units"])
    chosen = " (chosen)" if trial["method"] == q.method and list(trial["float_units"]) == list(q.float_units) else ""
    return (f"{q.precision.upper()} candidate {index}: {trial['method']}, {floats} {q.unit_kind}"
            f"{'' if floats == 1 else 's'} float{chosen}")


def _split_text(split) -> str:
    return f"{split.images} images from `{split.source}` (fingerprint {split.fingerprint[:16]})"


def near_tie_rule(artifact: Accuracy | None) -> str:
    """Fidelity's near-tie rule in words, with how many of the artifact's boxes it applied to."""
    text = (f"a box that is the neighbouring anchor a confident FP32 box won NMS over by less than {NEAR_TIE_SCORE:g} "
            "in score counts as that box")
    if artifact is not None and artifact.near_tie_boxes:
        text += f" ({artifact.near_tie_boxes} of the final artifact's did)"
    return text


def _found(accuracy: Accuracy) -> str:
    return accuracy.found_text() or "not applicable"


def _num(value) -> str:
    return "not reported" if value is None else f"{value}"


def _db(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else str(value)


def _frontier(points: list[tuple[float, float]]) -> set[int]:
    """Indices of the points no other point beats on both latency (lower) and mAP (higher)."""
    keep = set()
    for i, (lat, acc) in enumerate(points):
        if not any((l2 <= lat and a2 >= acc) and (l2 < lat or a2 > acc) for l2, a2 in points):
            keep.add(i)
    return keep


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def _inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _esc(text))


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_row(cells) -> str:
    return "| " + " | ".join(_md_text(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _md_text(text) -> str:
    """Markdown viewers render raw HTML: angle brackets in names and paths are escaped, except in code spans."""
    parts = str(text).split("`")
    return "`".join(part if i % 2 else part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                    for i, part in enumerate(parts))


STYLE = ("body{font-family:sans-serif;margin:24px auto;max-width:1100px;color:#222;line-height:1.4}"
         "h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:1.6em}"
         "table{border-collapse:collapse;margin:8px 0;font-size:0.9em}"
         "th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}"
         "th{background:#f0f0f0}code{background:#f4f4f4;padding:0 3px}figure{margin:12px 0}"
         "figcaption{font-size:0.85em;color:#555}nav ul{columns:2}svg text{font-family:sans-serif}")


# --- SVG ------------------------------------------------------------------------------------------------------

def _f(value: float) -> str:
    return f"{value:.2f}"


def _svg(width: int, height: int, body: list[str]) -> str:
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
            f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>' + "".join(body) + "</svg>")


def _text(x: float, y: float, text: str, size: int = 11, anchor: str = "start", fill: str = "#222",
          halo: bool = False) -> str:
    # A white outline under a label keeps it legible where it crosses a bar or a line.
    extra = ' stroke="#ffffff" stroke-width="3" paint-order="stroke"' if halo else ""
    return (f'<text x="{_f(x)}" y="{_f(y)}" font-size="{size}" text-anchor="{anchor}" fill="{fill}"{extra}>'
            f"{_esc(text)}</text>")


def _line(x1, y1, x2, y2, stroke="#444", width=1.0, dash: str | None = None) -> str:
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<line x1="{_f(x1)}" y1="{_f(y1)}" x2="{_f(x2)}" y2="{_f(y2)}" stroke="{stroke}" '
            f'stroke-width="{width}"{extra}/>')


def _rect(x, y, w, h, fill, stroke: str | None = None) -> str:
    extra = f' stroke="{stroke}"' if stroke else ""
    return f'<rect x="{_f(x)}" y="{_f(y)}" width="{_f(max(w, 0.0))}" height="{_f(h)}" fill="{fill}"{extra}/>'


def _ticks(low: float, high: float, count: int = 5, integer: bool = False) -> tuple[list[float], int]:
    """Round tick values from at or below `low` to at or above `high`, and the decimals to print them with."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if integer:
        step = max(step, 1)
    start = math.floor(low / step + 1e-9) * step
    ticks = [round(start, 10)]
    while ticks[-1] < high - step * 1e-9:
        ticks.append(round(start + step * len(ticks), 10))
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step < 1 else 0
    return ticks, decimals


class _Axis:
    def __init__(self, low: float, high: float, start: float, end: float, integer: bool = False):
        self.ticks, self.decimals = _ticks(low, high, integer=integer)
        self.low, self.high = self.ticks[0], self.ticks[-1]
        self.start, self.end = start, end

    def __call__(self, value: float) -> float:
        span = self.high - self.low or 1.0
        return self.start + (value - self.low) / span * (self.end - self.start)

    def label(self, value: float) -> str:
        return f"{value:.{self.decimals}f}"


def _x_axis(axis: _Axis, y: float, title: str, top: float) -> list[str]:
    out = [_line(axis.start, y, axis.end, y)]
    for t in axis.ticks:
        x = axis(t)
        out += [_line(x, top, x, y, stroke="#e6e6e6"), _line(x, y, x, y + 4), _text(x, y + 16, axis.label(t), 10,
                                                                                   "middle")]
    out.append(_text((axis.start + axis.end) / 2, y + 32, title, 11, "middle"))
    return out


def _y_axis(axis: _Axis, x: float, title: str, right: float) -> list[str]:
    out = [_line(x, axis.start, x, axis.end)]
    for t in axis.ticks:
        y = axis(t)
        out += [_line(x, y, right, y, stroke="#e6e6e6"), _line(x - 4, y, x, y), _text(x - 6, y + 3, axis.label(t),
                                                                                     10, "end")]
    mid = (axis.start + axis.end) / 2
    out.append(f'<text x="{_f(14)}" y="{_f(mid)}" font-size="11" text-anchor="middle" fill="#222" '
               f'transform="rotate(-90 {_f(14)} {_f(mid)})">{_esc(title)}</text>')
    return out


def _timeline_svg(timeline: tuple, origin: float) -> str:
    label_w, row_h, width = 170, 22, 1000
    height = 50 + row_h * len(timeline)
    end = max(e["started"] - origin + e["seconds"] for e in timeline)
    axis = _Axis(0.0, max(end, 0.01), label_w, width - 150)
    body = _x_axis(axis, 12 + row_h * len(timeline), "seconds since the first stage started", 8)
    for i, e in enumerate(timeline):
        y = 10 + i * row_h
        hit = e["cache_hit"]
        x0 = axis(e["started"] - origin)
        # A cache hit takes milliseconds: a minimum width keeps its bar visible.
        w = max(axis(e["started"] - origin + e["seconds"]) - x0, 2.0)
        body.append(_text(label_w - 6, y + 14, e["stage"], 11, "end"))
        body.append(_rect(x0, y + 3, w, row_h - 6, "#9ecae1" if hit else PALETTE[0]))
        note = f"hit {e['seconds']:.2f} s" if hit else f"ran {e['seconds']:.2f} s"
        body.append(_text(x0 + w + 4, y + 14, note, 10))
    return _svg(width, height, body)


def _drop_svg(bars: list[tuple[str, float, str]], budget: float) -> str:
    label_w, row_h, width = 380, 22, 1000
    height = 50 + row_h * len(bars)
    values = [b[1] for b in bars] + [budget, 0.0]
    axis = _Axis(min(values), max(values), label_w, width - 60)
    body = _x_axis(axis, 12 + row_h * len(bars), "mAP50-95 drop against FP32 (points)", 8)
    zero = axis(0.0)
    for i, (label, drop, split) in enumerate(bars):
        y = 10 + i * row_h
        x = axis(drop)
        body.append(_text(label_w - 6, y + 14, label, 10, "end"))
        body.append(_rect(min(x, zero), y + 3, abs(x - zero), row_h - 6, PALETTE[2] if split == "report"
                          else PALETTE[3]))
        body.append(_text(max(x, zero) + 4, y + 14, f"{drop:.2f}", 10))
    bx = axis(budget)
    body.append(_line(bx, 6, bx, 12 + row_h * len(bars), stroke=PALETTE[1], width=1.5, dash="5,3"))
    body.append(_text(bx, 6 + 8, f"budget {budget:.2f}", 10, "start", PALETTE[1]))
    return _svg(width, height, body)


def _histogram_svg(res: ProbeResult, low: float, high: float, colour: str) -> str:
    width, height = 1000, 260
    left, right, top, bottom = 60, width - 20, 20, height - 45
    samples = res.samples_ms
    x = _Axis(low, high, left, right)
    bins = 40
    span = (x.high - x.low) or 1.0
    counts = [0] * bins
    for s in samples:
        counts[min(int((s - x.low) / span * bins), bins - 1)] += 1
    y = _Axis(0, max(counts), bottom, top)
    body = _y_axis(y, left, "runs", right) + _x_axis(x, bottom, "latency (ms)", top)
    for i, c in enumerate(counts):
        if c:
            x0 = x(x.low + span * i / bins)
            x1 = x(x.low + span * (i + 1) / bins)
            body.append(_rect(x0, y(c), x1 - x0 - 1, bottom - y(c), colour))
    for name, dash in (("p50", "none"), ("p90", "6,3"), ("p99", "2,2")):
        value = res.latency_ms.get(name)
        if value is None:
            continue
        px = x(value)
        body.append(_line(px, top, px, bottom, stroke="#000", width=1.2, dash=None if dash == "none" else dash))
        body.append(_text(px + 3, top + 10 + 12 * ("p50", "p90", "p99").index(name), f"{name} {value}", 10,
                          halo=True))
    return _svg(width, height, body)


def _line_svg(xs: list, ys: list, x_title: str, y_title: str, colour: str, decimals: int) -> str:
    width, height = 490, 240
    left, right, top, bottom = 70, width - 20, 15, height - 45
    xa = _Axis(min(xs), max(xs), left, right, integer=True)
    ya = _Axis(min(ys), max(ys), bottom, top)
    body = _y_axis(ya, left, y_title, right) + _x_axis(xa, bottom, x_title, top)
    path = " ".join(f"{'M' if i == 0 else 'L'}{_f(xa(a))},{_f(ya(b))}" for i, (a, b) in enumerate(zip(xs, ys)))
    body.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
    for a, b in zip(xs, ys):
        body.append(f'<circle cx="{_f(xa(a))}" cy="{_f(ya(b))}" r="4" fill="{colour}"/>')
        body.append(_text(xa(a) + 5, ya(b) - 6, f"{b:.{decimals}f}", 9, halo=True))
    return _svg(width, height, body)


def _sensitivity_svg(units: list[dict], kept: set) -> str:
    label_w, row_h, width = 330, 16, 1000
    height = 50 + row_h * len(units)
    finite = [u["sqnr_db"] for u in units if isinstance(u["sqnr_db"], (int, float)) and math.isfinite(u["sqnr_db"])]
    axis = _Axis(min([0.0, *finite]), max([1.0, *finite]), label_w, width - 60)
    body = _x_axis(axis, 12 + row_h * len(units), "output SQNR with only this unit quantized (dB)", 8)
    zero = axis(0.0)
    for i, u in enumerate(units):
        y = 10 + i * row_h
        value = u["sqnr_db"]
        body.append(_text(label_w - 6, y + 12, f"{u['unit']} ({u['kind']})", 9, "end"))
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            body.append(_text(zero + 4, y + 12, f"{value} (not drawn)", 9))
            continue
        bx = axis(value)
        body.append(_rect(min(bx, zero), y + 2, abs(bx - zero), row_h - 4,
                          PALETTE[1] if u["unit"] in kept else PALETTE[4]))
        body.append(_text(max(bx, zero) + 4, y + 12, f"{value:.2f}", 9))
    return _svg(width, height, body)


def _pareto_svg(points: list, frontier: set, y_title: str) -> str:
    width, height = 1000, 360
    left, right, top, bottom = 80, width - 260, 20, height - 45
    lats = [res.latency_ms["p50"] for _, res, _ in points]
    maps = [acc.map50_95 for _, _, acc in points]
    pad_x = max((max(lats) - min(lats)) * 0.1, max(lats) * 0.05)
    pad_y = max((max(maps) - min(maps)) * 0.1, 0.005)
    xa = _Axis(max(min(lats) - pad_x, 0.0), max(lats) + pad_x, left, right)
    ya = _Axis(min(maps) - pad_y, min(max(maps) + pad_y, 1.0), bottom, top)
    body = _y_axis(ya, left, y_title, right) + _x_axis(xa, bottom, "p50 latency (ms)", top)
    on = sorted((lats[i], maps[i]) for i in frontier)
    if len(on) > 1:
        path = " ".join(f"{'M' if i == 0 else 'L'}{_f(xa(a))},{_f(ya(b))}" for i, (a, b) in enumerate(on))
        body.append(f'<path d="{path}" fill="none" stroke="{GREY}" stroke-width="1.5" stroke-dasharray="4,3"/>')
    for i, (label, res, acc) in enumerate(points):
        colour = PALETTE[i % len(PALETTE)]
        cx, cy = xa(res.latency_ms["p50"]), ya(acc.map50_95)
        body.append(f'<circle cx="{_f(cx)}" cy="{_f(cy)}" r="6" fill="{colour}"/>')
        body.append(_text(cx + 9, cy - 8, f"{label}: {res.latency_ms['p50']} ms, {acc.map50_95:.4f}", 10,
                          halo=True))
    return _svg(width, height, body)


def search_svg(plot: dict, standalone: bool = False) -> str:
    """Every timed trial (grey), the Pareto front (joined, coloured), the baseline (square), the chosen trial
    (ring) and the budget (dashed). Standalone, it is a file of its own and carries its caption."""
    width, height = 1000, 400
    left, right, top, bottom = 80, width - 250, 20, height - 45
    points, base, chosen = plot["points"], plot["baseline"], plot["chosen"]
    budget = base["map50_95"] - plot["max_map_drop"] / 100
    # A baseline whose runtime reported no p50 sets the budget but is not drawn.
    timed_base = base["p50_ms"] is not None
    lats = [p["p50_ms"] for p in points] + ([base["p50_ms"]] if timed_base else [])
    maps = [p["map50_95"] for p in points] + [base["map50_95"], budget]
    if not lats:
        lats = [1.0]
    pad_x = max((max(lats) - min(lats)) * 0.1, max(lats) * 0.05)
    pad_y = max((max(maps) - min(maps)) * 0.1, 0.005)
    xa = _Axis(max(min(lats) - pad_x, 0.0), max(lats) + pad_x, left, right)
    ya = _Axis(max(min(maps) - pad_y, 0.0), min(max(maps) + pad_y, 1.0), bottom, top)
    body = _y_axis(ya, left, "mAP50-95 (selection split)", right) + _x_axis(xa, bottom, "p50 latency (ms)", top)
    by = ya(budget)
    body.append(f'<line class="budget" x1="{_f(left)}" y1="{_f(by)}" x2="{_f(right)}" y2="{_f(by)}" '
                f'stroke="{PALETTE[1]}" stroke-width="1.5" stroke-dasharray="5,3"/>')
    body.append(_text(left + 6, by - 5, f"budget: {plot['max_map_drop']:.2f} points below the baseline", 10,
                      fill=PALETTE[1], halo=True))
    front = sorted((p for p in points if p["front"]), key=lambda p: (p["p50_ms"], -p["map50_95"]))
    if len(front) > 1:
        path = " ".join(f"{'M' if i == 0 else 'L'}{_f(xa(p['p50_ms']))},{_f(ya(p['map50_95']))}"
                        for i, p in enumerate(front))
        body.append(f'<path class="front" d="{path}" fill="none" stroke="{PALETTE[0]}" stroke-width="2"/>')
    # The front last, so a dominated point never hides one of it.
    for p in sorted(points, key=lambda p: p["front"]):
        title = f"{p['label']}: p50 {p['p50_ms']} ms, mAP50-95 {p['map50_95']:.4f}" + (" (busy)" if p["busy"] else "")
        kind, colour, r = ("trial front", PALETTE[0], 5) if p["front"] else ("trial", GREY, 4)
        body.append(f'<circle class="{kind}" cx="{_f(xa(p["p50_ms"]))}" cy="{_f(ya(p["map50_95"]))}" r="{r}" '
                    f'fill="{colour}"><title>{_esc(title)}</title></circle>')
    for p in front:
        body.append(_text(xa(p["p50_ms"]) + 8, ya(p["map50_95"]) + 14, p["label"], 9, halo=True))
    if timed_base:
        bx, byy = xa(base["p50_ms"]), ya(base["map50_95"])
        body.append(f'<rect class="baseline" x="{_f(bx - 7)}" y="{_f(byy - 7)}" width="14" height="14" '
                    'fill="none" stroke="#222" stroke-width="1.5"/>')
        body.append(_text(bx, byy - 11, "baseline", 10, "middle", halo=True))
    if chosen is not None and chosen["p50_ms"] is not None:
        cx, cy = xa(chosen["p50_ms"]), ya(chosen["map50_95"])
        body.append(f'<circle class="picked" cx="{_f(cx)}" cy="{_f(cy)}" r="10" fill="none" stroke="{PALETTE[3]}" '
                    f'stroke-width="2.5"/>')
    # The legend, right of the plot, names the marks in full; labels beside the points would cover each other.
    x, y = right + 20, top + 8
    legend = [(lambda y: f'<circle cx="{_f(x)}" cy="{_f(y)}" r="5" fill="{PALETTE[0]}"/>',
               ["the Pareto front, joined"]),
              (lambda y: f'<circle cx="{_f(x)}" cy="{_f(y)}" r="4" fill="{GREY}"/>', ["another trial"])]
    if timed_base:
        legend.append((lambda y: f'<rect x="{_f(x - 7)}" y="{_f(y - 7)}" width="14" height="14" fill="none" '
                                 'stroke="#222" stroke-width="1.5"/>', [f"the baseline: {base['label']}"]))
    if chosen is not None and chosen["p50_ms"] is not None:
        legend.append((lambda y: f'<circle cx="{_f(x)}" cy="{_f(y)}" r="10" fill="none" stroke="{PALETTE[3]}" '
                                 'stroke-width="2.5"/>',
                       _wrap(f"{chosen['how']}: {chosen['label']}, p50 {chosen['p50_ms']:.2f} ms, mAP50-95 "
                             f"{chosen['map50_95']:.4f}", 34)))
    for mark, lines in legend:
        body.append(mark(y))
        body += [_text(x + 16, y + 4 + 13 * i, line, 10) for i, line in enumerate(lines)]
        y += 13 * len(lines) + 14
    if not standalone:
        return _svg(width, height, body)
    # A file of its own has no figcaption: the caption is drawn under the plot, wrapped to the width.
    title = f"Pareto front: latency against mAP50-95 ({plot['target']}, profile {plot['profile'] or 'none'})"
    body.append(_text(left, height + 6, title, 12))
    lines = _wrap(search_caption(plot).replace("`", ""), 150)
    for i, line in enumerate(lines):
        body.append(_text(left, height + 24 + 14 * i, line, 10))
    svg = _svg(width, height + 36 + 14 * len(lines), body)
    return svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + ([line] if line else [])


def _ci(interval, form: str) -> str:
    """A figure's 95 % interval, or nothing when it was not computed."""
    return "" if not interval else f"{interval[0]:{form}}..{interval[1]:{form}}"
