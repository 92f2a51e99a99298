import pytest
import torch

from diffusers_uncertainty.segmentation import HardnessAwareSampler, mixture_weights


def test_difficulty_is_an_exact_moving_average():
    sampler = HardnessAwareSampler([1.0] * 3, momentum=0.8)
    sampler.update(torch.tensor([0, 1]), torch.tensor([2.0, 1.0]))
    sampler.update(torch.tensor([0]), torch.tensor([7.0]))
    assert sampler.difficulty.tolist() == pytest.approx([0.8 * 2.0 + 0.2 * 7.0, 1.0, 0.0])
    assert sampler.seen.tolist() == [True, True, False]


def test_batched_update_equals_updates_one_after_the_other_with_repeats():
    """Repeated indices in one update (sampling is with replacement) end where sequential updates end."""
    generator = torch.Generator().manual_seed(0)
    sampler = HardnessAwareSampler([1.0] * 6, momentum=0.7)
    difficulty, seen = [0.0] * 6, [False] * 6
    for _ in range(5):
        indices = torch.randint(0, 6, (8,), generator=generator)
        losses = torch.rand(8, generator=generator, dtype=torch.float64) * 3
        sampler.update(indices, losses)
        for index, loss in zip(indices.tolist(), losses.tolist()):
            difficulty[index] = 0.7 * difficulty[index] + 0.3 * loss if seen[index] else loss
            seen[index] = True
        assert sampler.difficulty.tolist() == pytest.approx(difficulty, rel=1e-12)
        assert sampler.seen.tolist() == seen


def test_draws_update_and_probabilities_read_nothing_on_the_host():
    from diffusers_uncertainty.training.performance import HostReadCounter

    sampler = HardnessAwareSampler([1.0] * 10, max_hardness=0.8, seed=0)
    sampler.set_progress(0.5)
    with HostReadCounter() as counter:
        for _ in range(3):
            indices = sampler.draw(4)
            sampler.update(indices, indices.double() / 10)
    assert counter.host_reads == 0, counter.host_read_operators
    assert sampler.draw(4).shape == (4,) and sampler.seen.any()


def test_distribution_starts_at_base_and_shifts_toward_hard_samples():
    base = [1.0, 1.0, 2.0, 4.0]
    sampler = HardnessAwareSampler(base, gamma=1.0, max_hardness=0.6, ramp=0.5)
    sampler.update(torch.arange(4), torch.tensor([1.0, 3.0, 1.0, 1.0]))
    expected_base = torch.tensor(base, dtype=torch.float64) / 8
    assert torch.allclose(sampler.probabilities(), expected_base)  # progress 0: base distribution
    hard = expected_base * torch.tensor([1.0, 3.0, 1.0, 1.0], dtype=torch.float64)
    hard = hard / hard.sum()
    sampler.set_progress(0.25)  # halfway up the ramp: mix 0.3
    assert torch.allclose(sampler.probabilities(), 0.7 * expected_base + 0.3 * hard)
    sampler.set_progress(1.0)  # past the ramp: mix 0.6
    assert sampler.hardness_mix == pytest.approx(0.6)
    assert torch.allclose(sampler.probabilities(), 0.4 * expected_base + 0.6 * hard)
    assert sampler.probabilities()[1] > expected_base[1]


def test_sampling_converges_toward_hard_samples_over_training():
    # 20 samples; samples 0-4 are hard (loss 4), the rest easy (loss 1). Simulated training with the sampler.
    losses = torch.ones(20)
    losses[:5] = 4.0
    sampler = HardnessAwareSampler([1.0] * 20, num_draws=400, gamma=2.0, max_hardness=0.9, seed=0)
    hard_share = []
    steps = 10
    for step in range(steps):
        draws = torch.tensor(list(iter(sampler)))
        hard_share.append((draws < 5).double().mean().item())
        sampler.update(draws, losses[draws])
        sampler.set_progress((step + 1) / steps)
    assert hard_share[0] == pytest.approx(0.25, abs=0.07)  # uniform at the start
    # Final distribution: 0.1 uniform + 0.9 * (5*16 / (5*16 + 15)) on the hard samples.
    expected_final = 0.1 * 0.25 + 0.9 * 80 / 95
    assert sampler.probabilities()[:5].sum().item() == pytest.approx(expected_final)
    assert hard_share[-1] == pytest.approx(expected_final, abs=0.07)
    assert hard_share[-1] > hard_share[len(hard_share) // 2] > hard_share[0]


def test_unseen_samples_get_mean_difficulty():
    sampler = HardnessAwareSampler([1.0] * 3, gamma=1.0, max_hardness=1.0)
    sampler.update(torch.tensor([0, 1]), torch.tensor([1.0, 3.0]))
    sampler.set_progress(1.0)
    assert torch.allclose(sampler.probabilities(), torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64) / 6)


def test_state_dict_round_trip_reproduces_draws():
    a = HardnessAwareSampler([1.0] * 10, num_draws=30, seed=3)
    a.update(torch.arange(10), torch.linspace(0.1, 2.0, 10))
    a.set_progress(0.7)
    list(iter(a))
    b = HardnessAwareSampler([1.0] * 10, num_draws=30, seed=99)
    b.load_state_dict(a.state_dict())
    assert list(iter(a)) == list(iter(b))
    with pytest.raises(ValueError, match="samples"):
        HardnessAwareSampler([1.0] * 4).load_state_dict(a.state_dict())


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="base_weights"):
        HardnessAwareSampler([])
    with pytest.raises(ValueError, match="non-negative"):
        HardnessAwareSampler([1.0, -1.0])
    sampler = HardnessAwareSampler([1.0, 1.0])
    with pytest.raises(ValueError, match="progress"):
        sampler.set_progress(1.5)
    sampler.update(torch.tensor([0]), torch.tensor([1.0]))
    sampler.check()
    sampler.update(torch.tensor([1]), torch.tensor([-1.0]))  # recorded on the device, raised where the host reads
    with pytest.raises(ValueError, match="`losses` must be finite and non-negative"):
        sampler.check()
    with pytest.raises(ValueError, match="must match"):
        sampler.update(torch.tensor([0, 1]), torch.tensor([1.0]))


def test_mixture_weights_give_each_dataset_its_share():
    weights = torch.tensor(mixture_weights([3, 1], [0.25, 0.75]))
    assert weights[:3].sum().item() == pytest.approx(0.25)
    assert weights[3:].sum().item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="2 datasets but 1 weights"):
        mixture_weights([3, 1], [1.0])


def test_state_dict_is_a_copy_that_later_updates_leave_alone():
    sampler = HardnessAwareSampler([1.0] * 3)
    sampler.update(torch.tensor([0]), torch.tensor([1.0]))
    state = sampler.state_dict()
    sampler.update(torch.tensor([1, 2]), torch.tensor([2.0, 3.0]))
    assert state["seen"].tolist() == [True, False, False] and state["difficulty"].tolist() == [1.0, 0.0, 0.0]


def test_final_base_weights_move_the_base_distribution_linearly_with_progress():
    start, end = [1.0, 1.0, 2.0, 0.0], [0.0, 1.0, 1.0, 2.0]  # normalised: [.25 .25 .5 0], [0 .25 .25 .5]
    sampler = HardnessAwareSampler(start, max_hardness=0.0, final_base_weights=end, seed=0)
    for progress, expected in ((0.0, [0.25, 0.25, 0.5, 0.0]), (0.5, [0.125, 0.25, 0.375, 0.25]),
                               (1.0, [0.0, 0.25, 0.25, 0.5])):
        sampler.set_progress(progress)
        torch.testing.assert_close(sampler.probabilities(), torch.tensor(expected, dtype=torch.float64))
    assert 0 not in sampler.draw(200).tolist()  # at the end the first sample has no weight left
    sampler.set_progress(0.0)
    assert 3 not in sampler.draw(200).tolist()
    # With hardness sampling, the hard distribution is taken relative to the current base.
    hard = HardnessAwareSampler(start, max_hardness=1.0, final_base_weights=end, seed=0)
    hard.update(torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 1.0, 1.0, 1.0]))
    hard.set_progress(1.0)
    torch.testing.assert_close(hard.probabilities(), torch.tensor([0.0, 0.25, 0.25, 0.5], dtype=torch.float64))
    # The schedule's position comes back with the state.
    restored = HardnessAwareSampler(start, max_hardness=0.0, final_base_weights=end, seed=0)
    sampler.set_progress(0.75)
    restored.load_state_dict(sampler.state_dict())
    torch.testing.assert_close(restored.probabilities(), sampler.probabilities())
    with pytest.raises(ValueError, match=r"`final_base_weights` must have one weight per sample like `base_weights` "
                                         r"\(4\), got shape \(3,\)"):
        HardnessAwareSampler(start, final_base_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="`final_base_weights` must be non-negative with a positive sum"):
        HardnessAwareSampler(start, final_base_weights=[0.0, 0.0, 0.0, 0.0])
