"""Mask computation for every pattern, without Lightning."""

import pytest
import torch

from lightning_accel import apply_masks_, compute_masks, mask_sparsity, tensor_sparsity
from lightning_accel.pruning import channel_mask, n_m_mask, parse_pattern


@pytest.fixture
def weights():
    generator = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(8, 4, 3, 3, generator=generator),
        "fc.weight": torch.randn(16, 32, generator=generator),
    }


def test_global_unstructured_prunes_exactly_the_smallest(weights):
    masks = compute_masks(weights, 0.9)
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.9 * total)
    kept = torch.cat([w[m].abs() for w, m in zip(weights.values(), masks.values(), strict=True)])
    pruned = torch.cat([w[~m].abs() for w, m in zip(weights.values(), masks.values(), strict=True)])
    assert pruned.max() <= kept.min()


def test_global_scope_differs_from_layer_scope():
    weights = {"small": torch.full((10,), 0.1) + torch.arange(10) * 1e-3, "large": torch.arange(1.0, 11.0)}
    global_masks = compute_masks(weights, 0.5, scope="global")
    layer_masks = compute_masks(weights, 0.5, scope="layer")
    assert not global_masks["small"].any() and global_masks["large"].all()
    assert int(layer_masks["small"].sum()) == 5 and int(layer_masks["large"].sum()) == 5


def test_previously_pruned_elements_stay_pruned(weights):
    first = compute_masks(weights, 0.3)
    # Make a pruned element large: magnitude alone would revive it, the previous mask must not.
    name = "fc.weight"
    index = (~first[name]).nonzero()[0].tolist()
    weights[name][tuple(index)] = 100.0
    second = compute_masks(weights, 0.6, previous=first)
    for n in weights:
        assert not (second[n] & ~first[n]).any()
    total = sum(w.numel() for w in weights.values())
    assert mask_sparsity(second) == pytest.approx(round(0.6 * total) / total)


def test_recomputing_at_the_same_sparsity_is_idempotent(weights):
    first = compute_masks(weights, 0.5)
    apply_masks_(weights, first)
    second = compute_masks(weights, 0.5, previous=first)
    assert all(torch.equal(first[n], second[n]) for n in weights)


def test_channels_zero_whole_rows_by_l2_norm(weights):
    weights["fc.weight"][3] *= 0.01  # the clearly smallest row
    mask = channel_mask(weights["fc.weight"], 0.25)
    rows_kept = mask.all(dim=1)
    assert torch.equal(rows_kept, mask.any(dim=1))  # each row all kept or all pruned
    assert int((~rows_kept).sum()) == 4 and not rows_kept[3]
    conv_mask = compute_masks(weights, 0.5, pattern="channels")["conv.weight"]
    assert int((~conv_mask.flatten(1).all(dim=1)).sum()) == 4


def test_n_m_keeps_n_of_every_m_consecutive_inputs(weights):
    mask = n_m_mask(weights["fc.weight"], 2, 4, sparsity=0.5)
    groups = mask.reshape(-1, 4)
    assert torch.equal(groups.sum(dim=1), torch.full((groups.shape[0],), 2))
    # Within each group the kept pair holds the two largest magnitudes.
    magnitudes = weights["fc.weight"].abs().reshape(-1, 4)
    smallest_kept = magnitudes[groups].reshape(-1, 2).min(dim=1).values
    assert (smallest_kept >= magnitudes[~groups].reshape(-1, 2).max(dim=1).values).all()


def test_n_m_is_reached_gradually(weights):
    w = weights["fc.weight"]
    quarter = n_m_mask(w, 2, 4, sparsity=0.25)
    assert int((~quarter).sum()) == round(0.25 * w.numel())
    assert (quarter.reshape(-1, 4).sum(dim=1) >= 2).all()
    final = n_m_mask(w, 2, 4, sparsity=0.5, previous=quarter)
    assert not (final & ~quarter).any()
    assert torch.equal(final.reshape(-1, 4).sum(dim=1), torch.full((w.numel() // 4,), 2))


def test_n_m_rejects_rows_that_do_not_divide():
    with pytest.raises(ValueError, match=r"multiple of 4.*\(8, 1, 3, 3\)"):
        n_m_mask(torch.randn(8, 1, 3, 3), 2, 4, 0.5)


@pytest.mark.parametrize("pattern", ["dense", "2-4", "4:4", "0:4", "5:4", "2:", ""])
def test_bad_patterns_name_the_argument_and_value(pattern):
    with pytest.raises(ValueError, match="`pattern`") as error:
        parse_pattern(pattern)
    assert repr(pattern) in str(error.value)


def test_apply_masks_zeroes_in_place_and_keeps_identity(weights):
    params = {n: torch.nn.Parameter(w.clone()) for n, w in weights.items()}
    ids = {n: id(p) for n, p in params.items()}
    masks = compute_masks(params, 0.75)
    apply_masks_(params, masks)
    assert {n: id(p) for n, p in params.items()} == ids
    assert tensor_sparsity(params) == pytest.approx(mask_sparsity(masks))
    assert all(torch.equal(params[n][masks[n]], weights[n][masks[n]]) for n in params)


@pytest.mark.parametrize("path", ["concatenated", "histogram"])
def test_global_threshold_matches_a_full_sort_with_ties_broken_by_position(monkeypatch, path):
    import lightning_accel.pruning.masks as masks_module

    if path == "histogram":  # the memory-lean path that large models take
        monkeypatch.setattr(masks_module, "_SMALL_TOTAL", 0)
    generator = torch.Generator().manual_seed(3)
    weights = {
        "a": torch.randint(-20, 20, (64, 33), generator=generator).float() / 4,  # many exact ties
        "b": torch.randn(17, 5, generator=generator),
        "c": torch.zeros(4, 4),
    }
    for sparsity in (0.1, 0.5, 0.77, 0.95):
        masks = compute_masks(weights, sparsity)
        flat = torch.cat([w.abs().flatten() for w in weights.values()])
        k = round(sparsity * flat.numel())
        # Reference: a stable sort by magnitude, so equal magnitudes are pruned in position order.
        order = torch.sort(flat, stable=True).indices
        expected = torch.ones_like(flat, dtype=torch.bool)
        expected[order[:k]] = False
        got = torch.cat([m.flatten() for m in masks.values()])
        assert torch.equal(got, expected), sparsity


def test_two_four_on_convolutions_groups_input_channels_as_sparse_tensor_cores_do():
    weight = torch.randn(8, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    mask = compute_masks({"conv": weight}, 0.5, pattern="2:4")["conv"]
    along_channels = mask.permute(0, 2, 3, 1).reshape(-1, 4)  # (out, kh, kw, in) in groups of 4 input channels
    assert (along_channels.sum(dim=1) == 2).all()  # every group of 4 input channels keeps exactly 2
    along_kernel = mask.reshape(-1, 4)  # the old layout: 4 consecutive elements of the flattened row
    assert not (along_kernel.sum(dim=1) == 2).all()
    kept = torch.where(mask, weight.abs(), torch.inf).permute(0, 2, 3, 1).reshape(-1, 4)
    dropped = torch.where(mask, -torch.inf, weight.abs()).permute(0, 2, 3, 1).reshape(-1, 4)
    assert (kept.min(dim=1).values >= dropped.max(dim=1).values).all()  # the two kept are each group's largest
    linear = torch.randn(6, 8)
    linear_mask = compute_masks({"fc": linear}, 0.5, pattern="2:4")["fc"]
    assert (linear_mask.reshape(6, 2, 4).sum(-1) == 2).all()  # Linear: along the input features, as before


def test_lamp_scores_ignore_a_layers_scale_and_keep_small_scale_layers_alive():
    from lightning_accel.pruning.masks import lamp_scores

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 30, generator=generator)
    assert torch.allclose(lamp_scores(weight * 1e-3), lamp_scores(weight), rtol=1e-4)
    values = torch.tensor([3.0, -1.0, 2.0])
    assert torch.allclose(lamp_scores(values), torch.tensor([1.0, 1 / 14, 4 / 13]))  # w^2 / sum of larger-or-equal
    weights = {
        "wide": torch.randn(64, 64, generator=generator),
        "small": torch.randn(64, 64, generator=generator) * 0.01,
    }
    global_masks = compute_masks(weights, 0.6)
    assert (~global_masks["small"]).float().mean() > 0.99  # one magnitude threshold empties the small layer
    lamp = compute_masks(weights, 0.6, scope="lamp")
    zeros = {name: (~mask).float().mean().item() for name, mask in lamp.items()}
    assert sum((~m).sum().item() for m in lamp.values()) == round(0.6 * 2 * 64 * 64)  # the target, exactly
    assert 0.4 < zeros["small"] < 0.8 and 0.4 < zeros["wide"] < 0.8
    again = compute_masks({k: v * lamp[k] for k, v in weights.items()}, 0.7, scope="lamp", previous=lamp)
    assert all(not (again[k] & ~lamp[k]).any() for k in lamp)  # what was pruned stays pruned
