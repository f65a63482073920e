"""sparsity_at: the pure schedule."""

import itertools

import pytest

from lightning_accel import sparsity_at


def test_cubic_follows_zhu_and_gupta():
    for step in (0, 10, 37, 50, 99):
        expected = 0.9 + (0.1 - 0.9) * (1 - (step - 0) / 100) ** 3
        assert sparsity_at(step, 0.9, "cubic", initial_sparsity=0.1, start_step=0, end_step=100) == pytest.approx(
            expected
        )


def test_linear_interpolates():
    assert sparsity_at(15, 0.8, "linear", start_step=10, end_step=20) == pytest.approx(0.4)


def test_one_shot_jumps_at_start_step():
    assert sparsity_at(4, 0.7, "one_shot", start_step=5, end_step=6) == 0.0
    assert sparsity_at(5, 0.7, "one_shot", start_step=5, end_step=6) == 0.7


@pytest.mark.parametrize("schedule", ["linear", "cubic"])
def test_gradual_schedules_are_dense_before_start_monotone_and_exact_at_end(schedule):
    values = [sparsity_at(t, 0.9, schedule, start_step=10, end_step=110) for t in range(0, 200)]
    assert values[:10] == [0.0] * 10
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[110:] == [0.9] * 90


def test_absolute_not_compounding():
    # Asking again at the same step gives the same answer (Lightning's ModelPruning amount compounds instead).
    first = sparsity_at(30, 0.5, "cubic", start_step=0, end_step=100)
    assert sparsity_at(30, 0.5, "cubic", start_step=0, end_step=100) == first


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(target_sparsity=1.0), "target_sparsity"),
        (dict(target_sparsity=-0.1), "target_sparsity"),
        (dict(target_sparsity="0.5"), "target_sparsity"),
        (dict(schedule="exponential"), "schedule"),
        (dict(initial_sparsity=0.95), "initial_sparsity"),
        (dict(start_step=-1), "start_step"),
        (dict(start_step=10, end_step=10), "end_step"),
        (dict(start_step=10, end_step=5), "end_step"),
    ],
)
def test_bad_schedule_arguments_name_the_argument_and_value(kwargs, argument):
    arguments = dict(step=0, target_sparsity=0.9, schedule="cubic", start_step=0, end_step=100) | kwargs
    with pytest.raises(ValueError, match=f"`{argument}`") as error:
        sparsity_at(**arguments)
    assert repr(kwargs[argument] if argument in kwargs else arguments[argument]) in str(error.value)
