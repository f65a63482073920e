"""Coupled channel groups, group masks, slim(), its exports, and pattern="channels" in training."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_accel import (
    MagnitudePruning,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    count_macs,
    export_program,
    export_slim,
    find_channel_groups,
    slim,
)
from lightning_accel.pruning import channel_sparsity, group_masks
from lightning_accel.quantization.prepare import float_copy
from tests.helpers import (
    EXAMPLE,
    CheckZerosAfterEveryStep,
    RandomImages,
    SaveRankState,
    assert_states_equal,
    fast_trainer_kwargs,
    fit_tiny,
    module_with_example,
)
from tests.slim_models import MLP, ConcatCNN, MobileNet, PlainCNN, ResNet, TimmStyleViT, TransformerClassifier

ARCHITECTURES = {
    "plain-cnn": (lambda: PlainCNN(), (2, 1, 8, 8)),
    "resnet": (lambda: ResNet(width=8, blocks=(1, 1), in_channels=1, num_classes=4, stem_stride=1), (2, 1, 8, 8)),
    "mobilenet": (lambda: MobileNet(), (2, 1, 8, 8)),
    "concat": (lambda: ConcatCNN(), (2, 1, 8, 8)),
    "mlp": (lambda: MLP(), (2, 16)),
    "transformer-ffn": (lambda: TransformerClassifier(), (2, 5, 16)),
    # fit-end crash before: "shape '[1, 5, 3, 3, 64]' is invalid" (the fused QKV slimmed across heads)
    "timm-vit": (lambda: TimmStyleViT(), (2, 1, 8, 8)),
}


def masked(name, sparsity=0.5):
    """A model of the named architecture with trained-looking BN statistics, pruned to ``sparsity`` of channels."""
    torch.manual_seed(0)
    build, shape = ARCHITECTURES[name]
    model = build()
    example = torch.randn(shape)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    groups = find_channel_groups(model, example)
    parameters = dict(model.named_parameters())
    masks = group_masks(parameters, groups, sparsity)
    with torch.no_grad():
        for parameter_name, mask in masks.items():
            parameters[parameter_name].mul_(mask)
    return model.eval(), example, groups


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_slim_model_computes_what_the_masked_model_computes(name):
    model, example, groups = masked(name)
    assert groups.groups, groups.summary()
    assert channel_sparsity(dict(model.named_parameters()), groups) == pytest.approx(0.5, abs=0.02)
    small = slim(model, example)
    with torch.no_grad():
        expected, actual = model(example), small(example)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    before, after = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in small.parameters())
    assert after < before
    assert all(p.numel() for p in model.parameters())  # the masked model itself kept every tensor's size
    if name not in (
        "transformer-ffn",
        "timm-vit",
    ):  # CNNs and MLPs: half the channels of every group leave ~1/4 of the work
        assert count_macs(small, example) < 0.45 * count_macs(model, example)


def test_groups_couple_batchnorm_residual_branches_depthwise_convs_and_flatten():
    _, _, plain = masked("plain-cnn")
    by_root = {g.root: g for g in plain.groups}
    assert [(m.module, m.role) for m in by_root["conv1"].members] == [("conv1", "out"), ("bn1", "out"), ("conv2", "in")]
    flatten = next(m for m in by_root["conv2"].members if m.module == "fc1")
    assert flatten.indices.numel() == 4 * 16  # each channel of conv2 feeds 2x2 flattened inputs of fc1
    assert "fc2" in plain.left_dense and "output" in plain.left_dense["fc2"]

    _, _, resnet = masked("resnet")
    stream = next(g for g in resnet.groups if g.root == "stem.0")
    # the stem, the first block's second conv and the next block's consumers share the residual stream
    assert {"stem.0", "stem.1", "layers.0.conv2", "layers.0.bn2", "layers.1.conv1", "layers.1.shortcut.0"} <= set(
        stream.modules()
    )

    _, _, concat = masked("concat")
    narrow = next(g for g in concat.groups if g.root == "narrow")
    # the second branch's channels sit after the first branch's in the BatchNorm and in the consumer's inputs
    assert next(m for m in narrow.members if m.module == "bn").indices.tolist() == [6, 7, 8, 9]

    _, _, mobile = masked("mobilenet")
    depthwise = next(g for g in mobile.groups if g.root == "blocks.0")
    assert {"stem.0", "stem.1", "blocks.0", "blocks.1", "blocks.3"} <= set(depthwise.modules())


def test_transformer_prunes_ffn_units_and_heads_and_keeps_the_residual_stream_dense_and_says_why():
    _, _, groups = masked("transformer-ffn")
    channels = [g for g in groups.groups if g.kind == "channels"]
    assert sorted(g.root for g in channels) == ["encoder.layers.0.linear1", "encoder.layers.1.linear1"]
    assert all(set(g.modules()) == {g.root, g.root.replace("linear1", "linear2")} for g in channels)
    heads = sorted((g for g in groups.groups if g.kind == "heads"), key=lambda g: g.root)
    assert [(g.owner, g.channels) for g in heads] == [(f"encoder.layers.{i}.self_attn", 2) for i in (0, 1)]
    reasons = " ".join(groups.left_dense.values())
    assert "LayerNorm" in reasons and "output" in reasons


def test_previous_masks_stay_pruned_as_sparsity_grows():
    model, _, groups = masked("mlp", 0.25)
    parameters = dict(model.named_parameters())
    first = group_masks(parameters, groups, 0.25)
    with torch.no_grad():  # make the pruned channels look important: they must stay pruned anyway
        for name, mask in first.items():
            parameters[name].masked_fill_(~mask, 0.0)
    second = group_masks(parameters, groups, 0.5, previous=first)
    assert all(not (second[name] & ~first[name]).any() for name in first)
    assert channel_sparsity(second, groups) == pytest.approx(0.5)


def test_include_exclude_and_tied_layers_are_left_dense_with_reasons():
    model = PlainCNN()
    groups = find_channel_groups(model, torch.randn(2, 1, 8, 8), exclude=["conv2"])
    assert "conv2" not in [g.root for g in groups.groups]
    assert "leave dense" in groups.left_dense["conv2"]
    tied = MLP(features=8, hidden=8)
    tied.net[3].weight = tied.net[1].weight
    groups = find_channel_groups(tied, torch.randn(2, 8))
    assert not groups.groups and any("shares a parameter" in r for r in groups.left_dense.values())


def test_slim_exports_onnx_and_pt2_that_match_the_masked_model(tmp_path):
    model, example, groups = masked("resnet")
    onnx_path = export_slim(model, tmp_path / "slim.onnx", example, groups)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch = torch.randn(5, 1, 8, 8)  # a batch size other than the example's: the batch dimension is dynamic
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    with torch.no_grad():
        expected = model(batch)
    torch.testing.assert_close(torch.from_numpy(onnx_out), expected, rtol=1e-4, atol=1e-4)
    program_path = export_slim(model, tmp_path / "slim.pt2", example, groups)
    loaded = torch.export.load(str(program_path)).module()
    torch.testing.assert_close(loaded(batch), expected, rtol=1e-5, atol=1e-5)
    assert onnx_path.stat().st_size < 0.5 * export_program(model, tmp_path / "dense.pt2", example).stat().st_size


def test_slim_of_a_qat_model_keeps_it_quantized_with_scales_for_the_kept_channels():
    from lightning_accel import calibrate_
    from lightning_accel.quantization import to_deployable

    model, example, groups = masked("plain-cnn")
    calibrate_(model, [torch.randn(8, 1, 8, 8) for _ in range(4)], model_input=lambda batch: batch)
    small = slim(model, example, groups)
    assert small.conv2.weight_quant.scale.numel() == small.conv2.out_channels == 8
    deployed_full, deployed_small = to_deployable(model), to_deployable(small)
    with torch.no_grad():
        torch.testing.assert_close(deployed_small(example), deployed_full(example), rtol=1e-4, atol=1e-4)


# --- the callback ---------------------------------------------------------------------------------------------


def channel_pruning(**kwargs):
    return MagnitudePruning(0.5, pattern="channels", start_step=2, end_step=10, every_n_steps=2, **kwargs)


def test_training_zeroes_whole_groups_after_every_step_and_keeps_parameters():
    pruning = channel_pruning()
    check = CheckZerosAfterEveryStep(pruning)
    module = module_with_example()
    identities = {name: id(p) for name, p in module.named_parameters()}
    _, module = fit_tiny([pruning, check], module, epochs=2)
    assert check.checked == 16 and check.violations == 0
    assert {name: id(p) for name, p in module.named_parameters()} == identities
    assert {"net.conv.weight", "net.conv.bias", "net.bn.weight", "net.bn.bias", "net.fc1.weight"} <= set(pruning.masks)
    assert int((~pruning.masks["net.bn.weight"]).sum()) == 4  # the BatchNorm of pruned conv channels is zero too
    assert channel_sparsity(dict(module.named_parameters()), pruning.channel_groups) == 0.5


def test_fails_at_setup_without_an_example_input_and_for_exports_it_cannot_write():
    with pytest.raises(ValueError, match="example_input_array"):
        fit_tiny([channel_pruning()])
    with pytest.raises(ValueError, match=r"`export_path` must be a path ending in \.onnx or \.pt2.*'model\.bin'"):
        channel_pruning(export_path="model.bin")
    with pytest.raises(ValueError, match="only pattern='channels'"):
        MagnitudePruning(0.5, export_path="model.onnx")


def test_export_path_writes_the_slim_onnx_and_int8_exports_are_slimmed(tmp_path):
    pruning = channel_pruning(export_path=str(tmp_path / "slim.onnx"))
    qat = QuantizationAwareTraining(start_step=4, export_path=str(tmp_path / "qat.int8.onnx"))
    ptq = PostTrainingQuantization(export_path=str(tmp_path / "ptq.int8.onnx"), calibration_batches=2)
    _, module = fit_tiny([pruning, qat, ptq], module_with_example(), epochs=2)
    import onnx

    for file, int8 in (("slim.onnx", False), ("qat.int8.onnx", True), ("ptq.int8.onnx", True)):
        graph = onnx.load(str(tmp_path / file)).graph
        shapes = [tuple(init.dims) for init in graph.initializer]
        # the conv kept 4 of its 8 output channels, and fc1 4 x 16 of its 128 inputs
        assert (4, 1, 3, 3) in shapes and (8, 64) in shapes, (file, shapes)
        assert any(node.op_type == "QuantizeLinear" for node in graph.node) == int8, file
    session = ort.InferenceSession(str(tmp_path / "slim.onnx"), providers=["CPUExecutionProvider"])
    float_model = float_copy(module).eval()  # the slim fp32 export is the float model; QAT writes the int8 one
    with torch.no_grad():
        expected = float_model(EXAMPLE)
    (actual,) = session.run(None, {session.get_inputs()[0].name: EXAMPLE.numpy()})
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=1e-4, atol=1e-4)


def test_resume_restores_group_masks_bit_for_bit(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    (tmp_path / "a").mkdir()
    fit_tiny(
        [channel_pruning(), checkpoints, SaveRankState(tmp_path / "a")],
        module_with_example(),
        epochs=3,
        enable_checkpointing=True,
    )
    (tmp_path / "b").mkdir()
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=3), callbacks=[channel_pruning(), SaveRankState(tmp_path / "b")])
    trainer.fit(module_with_example(), datamodule=RandomImages(), ckpt_path=tmp_path / "epoch=0.ckpt")
    a = torch.load(tmp_path / "a" / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "rank0.pt", weights_only=True)
    masks = [k for k in a if "/masks/" in k]
    assert any("net.bn.weight" in k for k in masks) and all(torch.equal(a[k], b[k]) for k in masks)
    assert_states_equal(
        {k: v for k, v in a.items() if k.startswith("model/")},
        {k: v for k, v in b.items() if k.startswith("model/")},
        atol=1e-6,
    )


def test_ddp_ranks_hold_identical_group_masks(tmp_path):
    fit_tiny(
        [channel_pruning(), SaveRankState(tmp_path)], module_with_example(), epochs=2, strategy="ddp_spawn", devices=2
    )
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_states_equal(rank0, rank1)
    bn = next(v for k, v in rank0.items() if k.endswith("/masks/net.bn.weight"))
    assert int((~bn).sum()) == 4


def test_slim_export_works_with_qat_listed_first(tmp_path):
    # QAT prepares the model in its setup before the pruning callback's dry run: the fp32 slim export must still
    # be the float model, in either list order.
    pruning = channel_pruning(export_path=str(tmp_path / "slim.onnx"))
    fit_tiny([QuantizationAwareTraining(start_step=4), pruning], module_with_example(), epochs=2)
    import onnx

    graph = onnx.load(str(tmp_path / "slim.onnx")).graph
    assert (4, 1, 3, 3) in [tuple(init.dims) for init in graph.initializer]
    assert not any(node.op_type == "QuantizeLinear" for node in graph.node)


def test_a_timm_style_vit_keeps_its_heads_when_its_forward_reads_the_width_and_slims_its_mlp():
    from lightning_accel.pruning.slim import removable_groups

    model, example, traced = masked("timm-vit")
    assert {g.owner for g in traced.groups if g.kind == "heads"} == {"blocks.0.attn", "blocks.1.attn"}
    groups = removable_groups(model, example, traced)  # reshape(B, N, C) fails with fewer heads: checked at setup
    assert {g.root for g in groups.groups} == {"blocks.0.fc1", "blocks.1.fc1"}
    for block in ("blocks.0", "blocks.1"):
        reason = groups.left_dense[f"{block}.attn.qkv, {block}.attn.proj"]
        assert "does not compute the same without its heads" in reason and "is invalid for input" in reason
