"""Int4 weights on a small Llama-style language model trained here, against ONNX Runtime's own quantizers.

The model (``benchmarks/llm_model.py``: 12.6M parameters, grouped-query attention, bytes as tokens) is trained on
the standard library's sources and evaluated on held-out files. Every row is an ONNX file run in ONNX Runtime on
the same held-out windows: perplexity (exp of the mean next-byte cross-entropy), file size, and prefill latency
(one forward over 256 tokens) at batch 1 and 8 against the fp32 file, alternating, medians. Our int4 rows also give
the perplexity PyTorch evaluates, which the file must reproduce (contract 14).

A second table generates greedily with the KV cache (``export_decoder_onnx``: one graph, past keys/values in and
out): prefill latency over a 64-token prompt and decode tokens/s over 32 new tokens, at batch 1 and 8, for the fp32
decoder, our int4 decoders and ONNX Runtime's own quantizers applied to the fp32 decoder file.

Int4 rows come in two kinds: W4A16 (``MatMulNBits`` at ``accuracy_level=1``: float activations, fp32 compute) and
8da4w (``accuracy_level=4``: the kernel rounds each token's activations to int8 per block; ours model that
rounding in PyTorch, ONNX Runtime's own tool writes the level without modelling it).

``llm_pruning.py`` compares Wanda with magnitude pruning (one-shot and after the same fine-tuning), and
``llm_torchao.py`` runs torchao's int4 configs where they run on this CPU (PyTorch eager: perplexity only is
comparable with the ORT rows).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import THREADS, Section, goal
from benchmarks.llm_model import calibration_batches, held_out_batches, perplexity, perplexity_of, trained_llama
from benchmarks.llm_pruning import wanda_section
from benchmarks.llm_torchao import torchao_section
from examples.llm.data import stdlib_text, token_windows
from examples.llm.model import Logits
from lightning_accel._core.modules import module_copy
from lightning_accel.export.check import ort_session
from lightning_accel.export.decoder import export_decoder_onnx, generation_speed
from lightning_accel.export.onnx import write_onnx
from lightning_accel.quantization.calibration import calibrate_
from lightning_accel.quantization.export import export_onnx
from lightning_accel.quantization.groupwise_qat import group_qat_to_deployable, prepare_group_qat_
from lightning_accel.quantization.weight_only import WeightOnlySettings, export_weight_only_onnx, quantize_weights

#: Training steps of each int4 QAT + distillation row (about 2 s each here).
QAT_STEPS = 60
#: Goals from the issue: our data-aware int4 perplexity <= ORT's best int4 at the same block size; file <= 0.30x.
SIZE_GOAL = 0.30


def ort_perplexity(session, batches: list[torch.Tensor]) -> float:
    """Perplexity of an ONNX file over ``batches``, computed like :func:`perplexity`."""
    name = session.get_inputs()[0].name
    return perplexity_of(lambda batch: torch.from_numpy(session.run(None, {name: batch.numpy()})[0]), batches)


def prefill_ratio(reference, candidate, batch: torch.Tensor, rounds: int) -> tuple[float, float, float]:
    """(fp32 ms, candidate ms, fp32 / candidate): medians over ``rounds`` alternating runs after a warm-up."""
    feed = {reference.get_inputs()[0].name: batch.numpy()}
    for session in (reference, candidate):
        session.run(None, feed)
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(rounds):
        for index, session in enumerate((reference, candidate)):
            start = time.perf_counter()
            session.run(None, feed)
            times[index].append(time.perf_counter() - start)
    fp32, other = statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3
    return fp32, other, fp32 / other


def ort_weight_only(
    fp32_path: Path, path: Path, block: int, algorithm: str, calibration, accuracy_level: int | None = None
) -> Path:
    """ONNX Runtime's ``MatMulNBitsQuantizer`` on the fp32 file: its default config (RTN, MLAS), HQQ or GPTQ.

    ``accuracy_level=4`` asks its kernel to round activations to int8 (ORT's 8da4w); ``None`` leaves ORT's default.
    """
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": b.numpy()} for b in calibration])

        def get_next(self):
            return next(self.batches, None)

    config = None
    if algorithm == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=block, bits=4)
    elif algorithm.startswith("gptq"):  # its group size follows the quantizer's block_size; 128 is its column batch
        config = GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), perchannel=False)
    symmetric = algorithm.endswith("-symmetric")
    quantizer = MatMulNBitsQuantizer(
        str(fp32_path),
        bits=4,
        block_size=block,
        is_symmetric=symmetric,
        algo_config=config,
        accuracy_level=accuracy_level,
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(path))
    return path


def decode_section(model: torch.nn.Module, calibration, quick: bool) -> Section:
    """Greedy generation with the KV cache in ORT: fp32 against int4 decoders, batch 1 and 8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    hf = model.model
    prompt_length, steps, repeats = (16, 8, 1) if quick else (64, 32, 3)
    prompts = {batch: calibration[0].repeat(2, 1)[:batch, :prompt_length] for batch in (1, 8)}
    rows, data = [], {}
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        files = {}
        files["fp32"], _ = export_decoder_onnx(hf, folder / "fp32.onnx", prompts[1], on_mismatch="raise")
        dynamic = folder / "ort_dynamic.onnx"
        quantize_dynamic(str(files["fp32"]), str(dynamic), per_channel=True, weight_type=QuantType.QInt8)
        files["ORT quantize_dynamic(per_channel), int8"] = dynamic
        block = 32
        files[f"ORT MatMulNBitsQuantizer RTN-SYMMETRIC, int4 block {block}"] = ort_weight_only(
            files["fp32"], folder / "ort_rtn.onnx", block, "rtn-symmetric", calibration
        )
        files[f"ORT 8da4w MatMulNBitsQuantizer RTN-SYMMETRIC accuracy_level 4, int4 block {block}"] = ort_weight_only(
            files["fp32"], folder / "ort_rtn_al4.onnx", block, "rtn-symmetric", calibration, accuracy_level=4
        )
        for group in (32,) if quick else (32, 128):
            for activations in ("float", "dynamic"):
                quantized = quantize_weights(
                    hf,
                    group_size=group,
                    method="gptq",
                    calibration=calibration,
                    calibration_batches=len(calibration),
                    activations=activations,
                )
                name = f"ours_{group}_{activations}.onnx"
                # 8da4w rounds per token: a greedy token may legitimately differ, so the check reports, not raises.
                path, check = export_decoder_onnx(
                    quantized, folder / name, prompts[1], on_mismatch="raise" if activations == "float" else "warn"
                )
                kind = "8da4w PTQ GPTQ" if activations == "dynamic" else "PTQ GPTQ"
                files[f"ours {kind} (symmetric), int4 groups of {group}"] = path
                data[f"check {group} {activations}"] = str(check)
        sessions = {label: ort_session(path, threads=THREADS) for label, path in files.items()}
        speeds = {label: {} for label in files}
        for _ in range(repeats):  # alternate the files, so drift in the machine's load favours none
            for batch, prompt in prompts.items():
                for label, session in sessions.items():
                    speed = generation_speed(session, hf.config, prompt, steps=steps, repeats=1)
                    speeds[label].setdefault(batch, []).append(speed)
        for label, by_batch in speeds.items():
            entry = {"bytes": files[label].stat().st_size}
            for batch, measured in by_batch.items():
                entry[f"prefill_ms_b{batch}"] = statistics.median(m.prefill_ms for m in measured)
                entry[f"tokens_per_s_b{batch}"] = statistics.median(m.decode_tokens_per_s for m in measured)
            data[label] = entry
        base = data["fp32"]
        for label, entry in data.items():
            if not isinstance(entry, dict):
                continue
            cells = []
            for batch in (1, 8):
                tokens, prefill = entry[f"tokens_per_s_b{batch}"], entry[f"prefill_ms_b{batch}"]
                ratio = tokens / base[f"tokens_per_s_b{batch}"]
                cells.append(f"{prefill:.1f} ms | {tokens:.0f} ({ratio:.2f}x)")
            rows.append(f"| {label} | {entry['bytes'] / 1e6:.2f} MB | {' | '.join(cells)} |")
    ours = {k: v["tokens_per_s_b1"] / data["fp32"]["tokens_per_s_b1"] for k, v in data.items() if k.startswith("ours")}
    best_label = max(ours, key=ours.get)
    best = ours[best_label]
    data["goal_decode_b1"] = {"speedup": best, "decoder": best_label}
    lines = [
        f"Greedy generation in ORT with the KV cache, {THREADS} threads: a {prompt_length}-token prompt (prefill), "
        f"then {steps} decode steps; tokens/s counts every sequence of the batch; medians of {repeats} alternating "
        "round(s). W4A16 rows run MatMulNBits at accuracy_level 1 (fp32 compute: the weights are unpacked to float, "
        "the activations stay float); 8da4w rows at accuracy_level 4 (the activations rounded to int8 per token and "
        "block, integer dot products); ours are the kernels whose output PyTorch evaluates.",
        "",
        "| decoder | file | prefill b1 | tokens/s b1 | prefill b8 | tokens/s b8 |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"- decode tokens/s at batch 1 >= 1.5x fp32 ORT: our best int4 {best:.2f}x ({best_label}), "
        f"{goal(best, 1.5, 'higher')}",
    ]
    return Section("Language model: generation with the KV cache (tokens/s)", "\n".join(lines) + "\n", data)


def int4_qat_with_distillation(model: Logits, quick: bool, group: int, activations: str = "float") -> Logits:
    """Int4 QAT from the float weights, distilled from the float model (KL at temperature 2), on training text.

    The functional form of ``QuantizationAwareTraining(weight_bits=4)`` with ``Distillation``: the rounded weights
    train with the straight-through gradient, the float model teaches. Returns the deployable copy.
    """
    teacher = model.model.eval()
    student = module_copy(model).train()
    prepare_group_qat_(student, WeightOnlySettings(bits=4, group_size=group, activations=activations))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0)
    train, _, _ = stdlib_text()
    steps, batch, length = (4, 4, 64) if quick else (QAT_STEPS, 8, 256)
    for step in range(steps):
        tokens = token_windows(train, length, batch, seed=5000 + step)
        with torch.no_grad():
            target = torch.log_softmax(teacher(input_ids=tokens).logits / 2.0, dim=-1)
        logits = student(tokens)
        loss = torch.nn.functional.kl_div(
            torch.log_softmax(logits / 2.0, dim=-1), target, log_target=True, reduction="batchmean"
        ) * 4.0 + torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return group_qat_to_deployable(student.eval())


def run(quick: bool) -> list[Section]:
    torch.manual_seed(0)
    model = Logits(trained_llama(quick)).eval()
    held_out, calibration = held_out_batches(quick), calibration_batches(quick)
    rounds = 3 if quick else 10
    rows, data = [], {}
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        fp32_path, _ = write_onnx(model, module_copy(model), folder / "fp32.onnx", held_out[0], on_mismatch="ignore")
        fp32_session = ort_session(fp32_path, threads=THREADS)
        fp32_bytes = fp32_path.stat().st_size
        torch_fp32 = perplexity(model.model, held_out)
        base_ppl = ort_perplexity(fp32_session, held_out)
        data["fp32"] = {"ppl_torch": torch_fp32, "ppl_ort": base_ppl, "bytes": fp32_bytes}
        rows.append(f"| fp32 | {torch_fp32:.3f} | {base_ppl:.3f} | {fp32_bytes / 1e6:.2f} MB (1.00x) | 1.00x | 1.00x |")

        candidates: list[tuple[str, Path, float | None]] = []
        failures: list[str] = []
        from onnxruntime.quantization import QuantType, quantize_dynamic

        dynamic = folder / "ort_dynamic.onnx"
        quantize_dynamic(str(fp32_path), str(dynamic), per_channel=True, weight_type=QuantType.QInt8)
        candidates.append(("ORT quantize_dynamic(per_channel), int8", dynamic, None))
        ours_dynamic = calibrate_(
            module_copy(model), calibration, len(calibration), model_input=lambda b: b, activations="dynamic"
        )
        path = export_onnx(ours_dynamic, folder / "ours_dynamic.onnx", held_out[0], on_mismatch="ignore")
        candidates.append(
            ("ours PTQ int8 (7-bit weights, dynamic activations)", path, perplexity(ours_dynamic.model, held_out))
        )
        blocks = (32,) if quick else (32, 128)
        for block in blocks:
            for algorithm in ("rtn-symmetric", "rtn-asymmetric", "hqq", "gptq-symmetric", "gptq-asymmetric"):
                if quick and algorithm.startswith(("hqq", "gptq")):  # ORT's GPTQ (numpy) takes minutes per block
                    continue
                label = f"ORT MatMulNBitsQuantizer {algorithm.upper()}, int4 block {block}"
                try:
                    path = ort_weight_only(
                        fp32_path, folder / f"ort_{algorithm}_{block}.onnx", block, algorithm, calibration
                    )
                except Exception as error:  # a failure of ORT's own tool is a finding, reported as it is
                    failures.append(f"- {label}: **failed** in ONNX Runtime's tool: {type(error).__name__}: {error}")
                    continue
                candidates.append((label, path, None))
            label = f"ORT 8da4w MatMulNBitsQuantizer RTN-SYMMETRIC accuracy_level 4, int4 block {block}"
            path = folder / f"ort_rtn_al4_{block}.onnx"
            candidates.append((label, ort_weight_only(fp32_path, path, block, "rtn-symmetric", calibration, 4), None))
            for activations, kind in (("float", ""), ("dynamic", "8da4w ")):
                started = time.perf_counter()
                qat = int4_qat_with_distillation(model, quick, block, activations)
                path = folder / f"ours_qat_{block}_{activations}.onnx"
                export_weight_only_onnx(qat, path, held_out[0], on_mismatch="ignore")
                qat_minutes = (time.perf_counter() - started) / 60
                label = f"ours {kind}QAT + distillation (symmetric), int4 groups of {block}"
                candidates.append((label, path, perplexity(qat.model, held_out)))
            for method, symmetric, activations in (
                ("rtn", True, "float"),
                ("gptq", True, "float"),
                ("gptq", False, "float"),
                ("rtn", True, "dynamic"),
                ("gptq", True, "dynamic"),
            ):
                quantized = quantize_weights(
                    model,
                    bits=4,
                    group_size=block,
                    symmetric=symmetric,
                    method=method,
                    calibration=calibration,
                    calibration_batches=len(calibration),
                    activations=activations,
                )
                path = folder / f"ours_{method}_{symmetric}_{block}_{activations}.onnx"
                export_weight_only_onnx(quantized, path, held_out[0], on_mismatch="ignore")
                kind = "symmetric" if symmetric else "asymmetric"
                prefix = "ours 8da4w PTQ" if activations == "dynamic" else "ours PTQ"
                label = f"{prefix} {method.upper()} ({kind}), int4 groups of {block}"
                candidates.append((label, path, perplexity(quantized.model, held_out)))

        for label, path, torch_ppl in candidates:
            session = ort_session(path, threads=THREADS)
            ppl = ort_perplexity(session, held_out)
            size = path.stat().st_size
            b1 = prefill_ratio(fp32_session, session, held_out[0][:1], rounds)
            b8 = prefill_ratio(fp32_session, session, held_out[0], max(rounds // 2, 2))
            data[label] = {
                "ppl_torch": torch_ppl,
                "ppl_ort": ppl,
                "bytes": size,
                "size_ratio": size / fp32_bytes,
                "prefill_b1_ms": [b1[0], b1[1]],
                "prefill_b8_ms": [b8[0], b8[1]],
                "prefill_b1_speedup": b1[2],
                "prefill_b8_speedup": b8[2],
            }
            shown = f"{torch_ppl:.3f}" if torch_ppl is not None else "-"
            rows.append(
                f"| {label} | {shown} | {ppl:.3f} | {size / 1e6:.2f} MB ({size / fp32_bytes:.2f}x) | "
                f"{b1[2]:.2f}x ({b1[1]:.1f} ms) | {b8[2]:.2f}x ({b8[1]:.0f} ms) |"
            )
    lines = [
        f"Held-out perplexity over {sum(len(b) for b in held_out)} windows of {held_out[0].shape[1]} bytes; "
        f"data-aware methods calibrate on {sum(len(b) for b in calibration)} training windows. Prefill: one forward "
        f"over {held_out[0].shape[1]} tokens, ORT, {THREADS} threads, speed-up against the fp32 file (fp32 / this), "
        "medians of alternating runs. MatMulNBits runs at accuracy_level 0/1 (fp32 compute) in every W4A16 row and at "
        "accuracy_level 4 (int8 activations per token and block) in every 8da4w row.",
        "",
        "| model | perplexity (PyTorch) | perplexity (ORT) | file | prefill batch 1 | prefill batch 8 |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
    ]
    lines += failures
    lines.append(
        f"- QAT + distillation: {QAT_STEPS if not quick else 4} steps of {8 if not quick else 4} x "
        f"{256 if not quick else 64} training tokens from the float "
        f"weights (AdamW 1e-4, KL at T=2 from the float model plus next-token loss), {qat_minutes:.1f} min here."
    )
    for block in blocks:
        for kind in ("", "8da4w "):
            fp32_ppl = data["fp32"]["ppl_ort"]
            rtn = data[f"ours {kind}PTQ RTN (symmetric), int4 groups of {block}"]["ppl_ort"]
            qat_ppl = data[f"ours {kind}QAT + distillation (symmetric), int4 groups of {block}"]["ppl_ort"]
            recovered = (rtn - qat_ppl) / (rtn - fp32_ppl) if rtn > fp32_ppl else float("nan")
            data[f"qat_recovered_{kind}block_{block}"] = recovered
            lines.append(
                f"- block {block}: {kind}QAT + distillation recovers {recovered:.0%} of the {kind}int4 RTN gap "
                f"({rtn:.3f} -> {qat_ppl:.3f}, fp32 {fp32_ppl:.3f}) >= 50%: {goal(recovered, 0.5, 'higher')}"
            )
        ours = data[f"ours 8da4w PTQ GPTQ (symmetric), int4 groups of {block}"]["ppl_ort"]
        theirs = data[f"ORT 8da4w MatMulNBitsQuantizer RTN-SYMMETRIC accuracy_level 4, int4 block {block}"]["ppl_ort"]
        lines.append(
            f"- block {block}: 8da4w (same kernel, accuracy_level 4): ours GPTQ {ours:.3f} against ORT's RTN "
            f"{theirs:.3f}: {goal(ours, theirs)}"
        )
    for block in blocks:
        ours = min(v["ppl_ort"] for k, v in data.items() if k.startswith("ours PTQ GPTQ") and k.endswith(f"of {block}"))
        theirs = min(
            v["ppl_ort"] for k, v in data.items() if k.startswith("ORT MatMulNBits") and k.endswith(f"block {block}")
        )
        size = min(v["size_ratio"] for k, v in data.items() if k.startswith("ours") and k.endswith(f"of {block}"))
        data[f"goal_block_{block}"] = {"ours": ours, "ort_best": theirs, "size_ratio": size}
        lines.append(
            f"- block {block}: our best data-aware int4 perplexity {ours:.3f} <= ORT's best int4 {theirs:.3f}: "
            f"{goal(ours, theirs)}; file {size:.2f}x fp32 <= {SIZE_GOAL}x: {goal(size, SIZE_GOAL)}"
        )
    perplexity_section = Section(
        "Language model: int4 weights against ONNX Runtime's quantizers", "\n".join(lines) + "\n", data
    )
    return [
        perplexity_section,
        decode_section(model, calibration, quick),
        wanda_section(model, held_out, calibration, quick),
        torchao_section(model, held_out, quick),
    ]
