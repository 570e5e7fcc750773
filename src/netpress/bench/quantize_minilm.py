"""``netpress bench quantize`` (MiniLM part): int8 dynamic and weight-only int4/int3 on the real
all-MiniLM-L6-v2, with the anchors in the same process.

Metric: mean cosine between the fp32 and the quantized sentence embeddings (token states mean-pooled
by the attention mask) on the ``sentences`` evaluation split (573 sentences; calibration uses the
disjoint calibration split). Latency: batch 32 (the first evaluation batch), 2 threads, all
candidates timed in interleaved rounds in one loop so the ratios hold on a shared machine (each
candidate's timed calls back to back after two warm-up calls: :data:`ROUNDS`); the speed-up is
against ONNX Runtime fp32 of the same model.

Rows:
  * ``minilm_int8_dynamic``: netpress ``dynamic`` on ONNX Runtime (``DynamicQuantizeMatMul``) and on
    OpenVINO (int8 compressed weights); anchors ``onnxruntime.quantization.quantize_dynamic``
    (defaults) and ``torch.ao.quantization.quantize_dynamic``;
  * ``minilm_int8_static``: netpress ``smoothquant`` (SmoothQuant scaling, static W8A8 QDQ) on
    OpenVINO (and on ONNX Runtime), and ``smoothquant, FFN-in float`` (the 6 FFN-in Linears left at
    OpenVINO's float precision, the faster mix on AMX); the anchors NNCF
    ``nncf.quantize(model_type=TRANSFORMER)`` -> OpenVINO int8 and OpenVINO without quantization
    (default precision: f32 on a CPU without bf16 support, bf16 where AMX / avx512_bf16 exist;
    netpress is then also timed with an f32 hint); each OpenVINO int8 model and OpenVINO fp32 are
    also timed compiled for the timed batch's static input shapes (``..., static shapes`` rows:
    latency only; their cosine is the dynamic-shape model's, as every evaluation batch has its own
    sequence length);
  * ``minilm_w4_g32`` / ``minilm_w4_g128`` / ``minilm_w3_g32`` / ``minilm_w3_g128``: netpress rtn,
    gptq, awq (cosine from torch; int4 latency from ONNX Runtime ``MatMulNBits``); anchor ONNX
    Runtime's ``MatMulNBitsQuantizer`` (RTN) at 4 bits. ``size_bytes`` of weight-only rows counts
    the quantized Linear weights (packed codes + scales + zeros); notes give the fp32 figure.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netpress.bench import row

THREADS = 2
SQ_ALPHA = 0.8  # smoothquant migration strength (per-group sweep in netpress.quantize.smooth)
FFN_IN = r"re:.*intermediate\.dense"  # the mixed smoothquant row leaves these Linears float


def _cos(outputs: list[torch.Tensor], batches: list[Any], ref: list[torch.Tensor]) -> float:
    from netpress.measure import compute_metric

    return float(compute_metric("cosine", outputs, batches, ref))


#: interleaved rounds; in each, every candidate runs 2 untimed warm-up calls, then its timed calls
#: back to back. Timing one call per candidate in turn was biased: ONNX Runtime's worker threads
#: keep spinning after a run and, on 2 cores, slowed whichever call came next by ~45 % (OpenVINO
#: smoothquant 58.8 ms right after the ORT fp32 session vs 40.1 ms for an identical model after
#: another one); idle pauses instead (50 ms) removed that but added ~5 ms of cold start to each call
ROUNDS = 4


def _round_robin(fns: dict[str, Callable[[], Any]], runs: int) -> dict[str, float]:
    """Median ms of every callable over ``runs`` timed calls, in :data:`ROUNDS` interleaved rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    per_round = max(1, runs // ROUNDS)
    for _ in range(ROUNDS):
        for k, f in fns.items():
            f()
            f()
            for _ in range(per_round):
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v) * 1000) for k, v in times.items()}


def _linear_bytes(model: torch.nn.Module) -> int:
    from netpress.nn.lowbit import LowBitLinear

    total = 0
    for m in model.modules():
        if isinstance(m, LowBitLinear):
            total += sum(t.numel() * t.element_size() for t in (m.qweight, m.scales, m.qzeros))
            if m.input_scale is not None:
                total += m.input_scale.numel() * 4
        elif type(m) is torch.nn.Linear:
            total += m.weight.numel() * 4
    return total


def run(quick: bool = False) -> list[dict[str, Any]]:
    """All MiniLM rows (``quick``: 4 evaluation batches, fewer timing runs, int4 g128 only).

    The ONNX files live in a temporary folder that is removed when the suite ends.
    """
    with tempfile.TemporaryDirectory(prefix="np-bench-minilm-") as tmp:
        return _run(quick, Path(tmp))


def _run(quick: bool, tmp: Path) -> list[dict[str, Any]]:
    import openvino as ov

    import netpress
    import netpress.zoo as zoo
    from netpress.export.onnx import OnnxRunner, export_onnx
    from netpress.measure import collect_outputs
    from netpress.measure.size import file_bytes
    from netpress.quantize.dynamic import export_dynamic
    from netpress.quantize.smooth import export_smoothquant_onnx
    from netpress.quantize.weight_only import export_matmul_nbits

    torch.set_num_threads(THREADS)
    model = zoo.load_model("minilm")
    data = zoo.load_data("sentences")
    ev = data.evaluation[:4] if quick else data.evaluation
    cal = data.calibration
    ref = collect_outputs(model, ev)
    example = ev[0]  # batch 32
    runs = 5 if quick else 20
    rows: list[dict[str, Any]] = []
    fp32 = export_onnx(model, example.slice(1), tmp / "fp32.onnx")
    r_fp = OnnxRunner(fp32, THREADS)
    feeds = r_fp.feeds(example)
    core = ov.Core()

    def ov_compile(model: Path | Any, precision: str | None = None, static: bool = False) -> Any:
        """``static``: the model reshaped to the timed batch's exact input shapes first (OpenVINO
        then compiles for that one shape instead of dynamic batch and sequence dimensions)."""
        cfg: dict[str, Any] = {"INFERENCE_NUM_THREADS": THREADS}
        if precision:
            cfg["INFERENCE_PRECISION_HINT"] = precision
        m = core.read_model(str(model)) if isinstance(model, Path) else model.clone()
        if static:
            m.reshape({k: list(v.shape) for k, v in feeds.items()})
        return core.compile_model(m, "CPU", cfg)

    shape = "x".join(str(d) for d in next(iter(feeds.values())).shape)
    static_note = (f"; static shapes: compiled for the timed batch's {shape} inputs (cosine of the "
                   "same model with dynamic shapes, which every evaluation batch needs)")

    def add_static(key: str, model: Path | Any) -> None:
        """A latency-only twin of row ``key``, compiled for the timed input shapes."""
        c = ov_compile(model, static=True)
        fns[f"{key}_static"] = (lambda c=c: c(feeds))
        info[f"{key}_static"] = dict(info[key], method=f"{info[key]['method']}, static shapes",
                                     notes=info[key]["notes"] + static_note)

    def ort_cos(path: Path) -> tuple[float, OnnxRunner]:
        r = OnnxRunner(path, THREADS)
        return _cos([torch.from_numpy(r.run(b)) for b in ev], ev, ref), r

    def ov_cos(compiled: Any) -> float:
        outs = [torch.from_numpy(np.array(compiled(r_fp.feeds(b))[0])) for b in ev]
        return _cos(outs, ev, ref)

    base = dict(suite="quantize", metric_name="cosine", threads=THREADS, batch=example.size)
    fns: dict[str, Callable[[], Any]] = {"ort_fp32": lambda: r_fp.session.run(None, feeds)}
    info: dict[str, dict[str, Any]] = {}

    # ---- int8 dynamic -------------------------------------------------------------------
    t = time.perf_counter()
    qd = netpress.quantize(copy.deepcopy(model), {"method": "dynamic"})
    secs = time.perf_counter() - t
    export_dynamic(qd, example.slice(1), tmp / "dyn_ort.onnx")
    export_dynamic(qd, example.slice(1), tmp / "dyn_ov.onnx", runtime="openvino")
    cos, r_dyn = ort_cos(tmp / "dyn_ort.onnx")
    fns["np_dyn_ort"] = lambda: r_dyn.session.run(None, feeds)
    info["np_dyn_ort"] = dict(case="minilm_int8_dynamic", tool="netpress", method="dynamic",
                              runtime="onnxruntime", metric=cos, compress_seconds=secs,
                              size_bytes=file_bytes(tmp / "dyn_ort.onnx"),
                              notes="DynamicQuantizeMatMul u8xs8, per-channel int8 weights")
    c_dyn = ov_compile(tmp / "dyn_ov.onnx")
    fns["np_dyn_ov"] = lambda: c_dyn(feeds)
    info["np_dyn_ov"] = dict(case="minilm_int8_dynamic", tool="netpress", method="dynamic",
                             runtime="openvino", metric=ov_cos(c_dyn), compress_seconds=secs,
                             size_bytes=file_bytes(tmp / "dyn_ov.onnx"),
                             notes="int8 compressed weights, OpenVINO dynamic activation quant")
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    t = time.perf_counter()
    ort_quantize_dynamic(str(fp32), str(tmp / "anchor_dyn.onnx"))
    secs = time.perf_counter() - t
    cos, r_anc = ort_cos(tmp / "anchor_dyn.onnx")
    fns["ort_dyn"] = lambda: r_anc.session.run(None, feeds)
    info["ort_dyn"] = dict(case="minilm_int8_dynamic", tool="onnxruntime", method="quantize_dynamic",
                           runtime="onnxruntime", metric=cos, compress_seconds=secs,
                           size_bytes=file_bytes(tmp / "anchor_dyn.onnx"), notes="defaults")
    t = time.perf_counter()
    tq = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                dtype=torch.qint8)
    secs = time.perf_counter() - t
    tq_cos = _cos(collect_outputs(tq, ev), ev, ref)

    def tq_run() -> None:
        with torch.inference_mode():
            example.run(tq)

    fns["torch_ao_dyn"] = tq_run
    info["torch_ao_dyn"] = dict(case="minilm_int8_dynamic", tool="torch.ao", method="quantize_dynamic",
                                runtime="torch", metric=tq_cos, compress_seconds=secs, size_bytes=0,
                                notes="torch eager (fbgemm)")

    # ---- static int8: netpress smoothquant; anchors NNCF and OpenVINO without quantization -----
    c_def = ov_compile(fp32)
    prec = str(c_def.get_property("INFERENCE_PRECISION_HINT"))
    fns["ov_default"] = lambda: c_def(feeds)
    info["ov_default"] = dict(case="minilm_int8_static", tool="openvino", method="no quantization",
                              runtime="openvino", metric=ov_cos(c_def), compress_seconds=0.0,
                              size_bytes=file_bytes(fp32),
                              notes=f"default inference precision (here {prec})")
    add_static("ov_default", fp32)
    t = time.perf_counter()
    qs = netpress.quantize(copy.deepcopy(model), {"method": "smoothquant", "alpha": SQ_ALPHA},
                           data=cal)
    secs = time.perf_counter() - t
    sq_info = export_smoothquant_onnx(qs, example.slice(1), tmp / "sq.onnx")
    sq_note = (f"alpha {SQ_ALPHA}, minmax, {len(sq_info['integer'])} Linears int8 "
               f"({len(sq_info['float'])} float), attention matmuls float; calibration "
               f"{sum(b.size for b in cal)} sentences")
    strict = "f32" in prec or "float32" in prec  # default already strict fp32 (no bf16 ISA)
    for prec_hint in (None,) if strict else (None, "f32"):
        c_sq = ov_compile(tmp / "sq.onnx", prec_hint)
        key = f"np_sq_ov_{prec_hint or 'default'}"
        fns[key] = (lambda c=c_sq: c(feeds))
        info[key] = dict(case="minilm_int8_static", tool="netpress", method="smoothquant",
                         runtime="openvino", metric=ov_cos(c_sq), compress_seconds=secs,
                         size_bytes=file_bytes(tmp / "sq.onnx"),
                         notes=f"{sq_note}; precision hint {prec_hint or 'default (' + prec + ')'}")
    add_static("np_sq_ov_default", tmp / "sq.onnx")
    # FFN-in left float: on AMX its int8 kernel (with GELU and the next layer's quantizer fused
    # behind it) measured slower than bf16 (1.58 vs 1.11 ms per layer), while FFN-out gains
    t = time.perf_counter()
    qm = netpress.quantize(copy.deepcopy(model), {"method": "smoothquant", "alpha": SQ_ALPHA,
                                                  "ignore": [FFN_IN]}, data=cal)
    secs_m = time.perf_counter() - t
    m_info = export_smoothquant_onnx(qm, example.slice(1), tmp / "sq_mixed.onnx")
    c_m = ov_compile(tmp / "sq_mixed.onnx")
    fns["np_sq_mixed"] = lambda: c_m(feeds)
    info["np_sq_mixed"] = dict(
        case="minilm_int8_static", tool="netpress", method="smoothquant, FFN-in float",
        runtime="openvino", metric=ov_cos(c_m), compress_seconds=secs_m,
        size_bytes=file_bytes(tmp / "sq_mixed.onnx"),
        notes=f"ignore {FFN_IN}: {len(m_info['integer'])} Linears int8, the 6 FFN-in Linears at "
        f"OpenVINO's default float precision ({prec}); otherwise as smoothquant")
    add_static("np_sq_mixed", tmp / "sq_mixed.onnx")
    cos, r_sq = ort_cos(tmp / "sq.onnx")
    fns["np_sq_ort"] = lambda: r_sq.session.run(None, feeds)
    info["np_sq_ort"] = dict(case="minilm_int8_static", tool="netpress", method="smoothquant",
                             runtime="onnxruntime", metric=cos, compress_seconds=secs,
                             size_bytes=file_bytes(tmp / "sq.onnx"), notes=f"{sq_note}; ORT QDQ")
    try:
        import nncf

        t = time.perf_counter()
        calib = nncf.Dataset([r_fp.feeds(b) for b in cal])
        q_ov = nncf.quantize(core.read_model(str(fp32)), calib,
                             model_type=nncf.ModelType.TRANSFORMER)
        secs = time.perf_counter() - t
        c_nncf = core.compile_model(q_ov, "CPU", {"INFERENCE_NUM_THREADS": THREADS})
        fns["nncf"] = lambda: c_nncf(feeds)
        info["nncf"] = dict(case="minilm_int8_static", tool="nncf", method="nncf.quantize TRANSFORMER",
                            runtime="openvino", metric=ov_cos(c_nncf), compress_seconds=secs,
                            size_bytes=0, notes="OpenVINO int8")
        add_static("nncf", q_ov)
    except Exception as exc:  # noqa: BLE001 - an anchor failing is reported, not fatal
        rows.append(row(**base, case="minilm_int8_static", tool="nncf", method="nncf.quantize",
                        metric=None, size_bytes=0, latency_ms=None, speedup_vs_fp32=None,
                        compress_seconds=None, runtime="openvino", notes=f"failed: {exc}"[:200]))

    # ---- weight-only ------------------------------------------------------------------------
    fp32_linear = _linear_bytes(model)
    settings = [(4, 128)] if quick else [(4, 32), (4, 128), (3, 32), (3, 128)]
    for bits, group in settings:
        case = f"minilm_w{bits}_g{group}"
        for method in ("rtn", "gptq", "awq"):
            t0, c0 = time.perf_counter(), time.process_time()
            q = netpress.quantize(copy.deepcopy(model), {"method": method, "weights": {
                "bits": bits, "group_size": group}}, data=cal)
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            key = f"np_{method}_{bits}_{group}"
            entry = dict(case=case, tool="netpress", method=method, runtime="torch",
                         metric=_cos(collect_outputs(q, ev), ev, ref), compress_seconds=secs,
                         size_bytes=_linear_bytes(q),
                         notes=f"Linear weights {_linear_bytes(q) / fp32_linear:.1%} of fp32 "
                         f"({fp32_linear:,} B); compress CPU {cpu:.0f} s; cosine from torch "
                         "(unpacked at load)")
            if bits == 4:
                path = tmp / f"{key}.onnx"
                export_matmul_nbits(q, example.slice(1), path)
                r = OnnxRunner(path, THREADS)
                fns[key] = (lambda r=r: r.session.run(None, feeds))
                entry["runtime"] = "onnxruntime MatMulNBits"
                entry["notes"] += "; latency: ORT MatMulNBits accuracy_level 4"
                info[key] = entry
            else:
                rows.append(row(**base, **entry, latency_ms=None, speedup_vs_fp32=None))
        if bits == 4:
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            t = time.perf_counter()
            mq = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=group, is_symmetric=False)
            mq.process()
            mq.model.save_model_to_file(str(tmp / f"ort_nbits_{group}.onnx"))
            secs = time.perf_counter() - t
            cos, r = ort_cos(tmp / f"ort_nbits_{group}.onnx")
            fns[f"ort_nbits_{group}"] = (lambda r=r: r.session.run(None, feeds))
            info[f"ort_nbits_{group}"] = dict(
                case=case, tool="onnxruntime", method="MatMulNBitsQuantizer (RTN)",
                runtime="onnxruntime MatMulNBits", metric=cos, compress_seconds=secs,
                size_bytes=file_bytes(tmp / f"ort_nbits_{group}.onnx"), notes="asymmetric")
    lat = _round_robin(fns, runs)
    rows.insert(0, row(**base, case="minilm_fp32", tool="onnxruntime", method="fp32",
                       runtime="onnxruntime", metric=1.0, size_bytes=file_bytes(fp32),
                       latency_ms=lat["ort_fp32"], speedup_vs_fp32=1.0, compress_seconds=0.0,
                       notes="the reference"))
    for key, entry in info.items():
        rows.append(row(**base, **entry, latency_ms=lat[key],
                        speedup_vs_fp32=lat["ort_fp32"] / lat[key]))
    return rows


__all__ = ["run"]
