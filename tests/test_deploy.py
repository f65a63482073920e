"""The deploy stage: every artifact built once, in one place, whatever the callback order; techniques independent."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from lightning import Trainer

from lightning_accel import (
    AccelerationReport,
    MagnitudePruning,
    MixedPrecision,
    QuantizationAwareTraining,
)
from lightning_accel.deploy import Contribution, build_artifacts
from tests.helpers import RandomImages, fast_trainer_kwargs, module_with_example


def _all_callbacks(tmp_path, order):
    callbacks = {
        "precision": MixedPrecision("bf16-mixed", export_half=str(tmp_path / "model.bf16.pt")),
        "pruning": MagnitudePruning(0.5, pattern="channels", end_step=4, every_n_steps=2),
        "qat": QuantizationAwareTraining(start_step=2, export_path=str(tmp_path / "model.int8.onnx")),
        "report": AccelerationReport(directory=tmp_path / "report", max_batches=2, plots=False, latency=False),
    }
    return [callbacks[name] for name in order]


@pytest.mark.parametrize(
    "order", [("precision", "pruning", "qat", "report"), ("report", "qat", "pruning", "precision")]
)
def test_every_artifact_is_built_once_and_listed_once_whatever_the_order(tmp_path, monkeypatch, order):
    import torch

    written = Counter()
    original = torch.onnx.export

    def counting(model, args, path, *rest, **kwargs):  # every ONNX file is traced here, under a temporary name
        name = Path(path).name.lstrip(".").split(".tmp-")[0]
        if "dry_run" not in name:
            written[name] += 1
        return original(model, args, path, *rest, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", counting)
    callbacks = _all_callbacks(tmp_path, order)
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=1), callbacks=callbacks)
    trainer.fit(module_with_example(), datamodule=RandomImages())
    assert written == {"model.int8.onnx": 1, "model.fp32.onnx": 1, "model.slim.onnx": 1}
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    paths = [entry["path"] for entry in saved["sizes"].values()]
    assert len(paths) == len(set(paths))  # each file listed once
    assert saved["sizes"]["int8 ONNX"]["path"] == str(tmp_path / "model.int8.onnx")
    assert saved["sizes"]["int8 ONNX"]["requested_by"] == ["QuantizationAwareTraining", "AccelerationReport"]
    assert "evaluated model" in saved["sizes"]["int8 ONNX"]["checked_against"]
    assert saved["sizes"]["bfloat16 state dict"]["path"] == str(tmp_path / "model.bf16.pt")
    assert saved["precision"] == "bf16-mixed"


def test_building_stays_inside_the_deploy_stage_and_the_techniques_interfaces(tmp_path):
    """From the end of fit to the written files: no call returns to a technique's callback or to the report."""
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=1), callbacks=_all_callbacks(tmp_path, ["pruning", "qat"]))
    module = module_with_example()
    trainer.fit(module, datamodule=RandomImages())
    contributions = [c.deploy_contribution(trainer, module) for c in trainer.callbacks[:2]]
    entered = set()

    def profile(frame, event, arg):
        if event == "call":
            entered.add(frame.f_globals.get("__name__", ""))

    sys.setprofile(profile)
    try:
        build = build_artifacts(module, contributions, module.example_input_array)
    finally:
        sys.setprofile(None)
    ours = {name for name in entered if name.startswith("lightning_accel")}
    # The build may use every technique's functions (plan, act, convert, export) but never a callback's hooks, the
    # report or the command; QAT's module is entered once, for the contribution's lambda that hands the model over.
    callbacks = {"lightning_accel.pruning.callback", "lightning_accel.precision.callback"}
    outside = {
        name
        for name in ours
        if name in callbacks
        or name.startswith(("lightning_accel.report", "lightning_accel.cli"))
        or name == "lightning_accel.quantization.ptq"
    }
    assert not outside, f"the build called into {sorted(outside)}"
    assert "lightning_accel.deploy.stage" in ours and "lightning_accel.pruning.slim" in ours  # the test sees calls
    assert {"int8 ONNX"} <= set(build.artifacts)


def test_a_contribution_without_a_report_writes_only_what_was_asked(tmp_path):
    module = module_with_example()
    build = build_artifacts(module, [Contribution(owner="me", half_path=tmp_path / "w.bf16.pt")], None)
    assert list(build.artifacts) == ["bfloat16 state dict"] and [p.name for p in tmp_path.iterdir()] == ["w.bf16.pt"]
