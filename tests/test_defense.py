"""The defense-effect measurement (benchmarks/bench_defense.py): R@k and attack success rate against a direct count on a
hand-made similarity matrix, and at test size a tower trained on poisoned pairs learns the backdoor while the same
tower trained without the poisoned rows does not."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_defense  # noqa: E402
import realdata  # noqa: E402
import realdata_tower  # noqa: E402


def test_recall_and_attack_success_on_a_hand_made_matrix():
    # 4 images x 5 captions; image i's true caption is truth[i]; caption 4 is the attack target.
    similarity = torch.tensor([[0.9, 0.1, 0.2, 0.3, 0.0],   # truth 0: rank 0; target ranked 5th
                               [0.5, 0.4, 0.6, 0.1, 0.7],   # truth 1: 3 captions above (0, 2, 4); target first
                               [0.2, 0.3, 0.3, 0.1, 0.3],   # truth 2: ties with 1 and 4 count in its favour
                               [0.1, 0.2, 0.3, 0.4, 0.4]])  # truth 3: tied first with the target
    truth = torch.tensor([0, 1, 2, 3])
    direct = {k: np.mean([(similarity[i] > similarity[i, truth[i]]).sum().item() < k for i in range(4)])
              for k in (1, 2, 5)}
    assert direct == {1: 0.75, 2: 0.75, 5: 1.0}
    assert bench_defense.recall_at(similarity, truth, ks=(1, 2, 5)) == pytest.approx(direct)
    # Target first for images 1, 2 (tie) and 3 (tie): 3 of 4.
    assert bench_defense.attack_success_rate(similarity, 4) == pytest.approx(0.75)
    assert bench_defense.attack_success_rate(similarity, 0) == pytest.approx(0.25)
    assert bench_defense.attack_success_rate(similarity[:1], 4) == 0.0


@pytest.fixture(scope="module")
def small_poisoned(tmp_path_factory):
    """The test-size train part with 15% of its rows poisoned by SIG (blended at alpha 0.4, strong enough for the tiny
    tower to learn in its 80 steps), and the same attack's trigger on the test images."""
    from cfbd_fast.poison import TriggerOptions, poison_dataset
    from realdata_tower import SMALL_TOWER

    torch.set_num_threads(1)
    data = realdata.ensure_all(realdata.SMALL_CACHE, small=True, progress=False)
    cache = Path(data["cache"])
    material = bench_defense.Material(cache, SMALL_TOWER, part="train")
    work = tmp_path_factory.mktemp("defense")
    options = TriggerOptions(alpha=0.4)
    poison_dataset(cache / "train" / "data.csv", work / "train.poison", "sig", rate=0.15, seed=0,
                   options=options, clean_images="reference", progress=False)
    poison_dataset(cache / "test" / "data.csv", work / "test.trigger", "sig", image_only=True, seed=0,
                   options=options, clean_images="reference", progress=False)
    images, captions, poisoned = bench_defense.poisoned_case(material, work / "train.poison")
    test_rows = bench_defense.read_csv_rows(work / "test.trigger" / "data.csv")
    keep = [k for k, row in enumerate(test_rows) if row["caption"] != bench_defense.TARGET_CAPTION]
    triggered = realdata_tower.load_images(work / "test.trigger", material.preprocess,
                                           [test_rows[k]["image"] for k in keep])
    return material, images, captions, poisoned, triggered


@pytest.mark.slow
def test_backdoor_is_learned_from_poisoned_rows_and_not_without_them(small_poisoned):
    material, images, captions, poisoned, triggered = small_poisoned
    assert 0.14 < poisoned.mean() < 0.16 and len(triggered) == len(material.test_truth) - 1
    seed = 0
    attacked = bench_defense.train_and_measure(material, images, captions, {"sig": triggered}, seed)
    clean = np.flatnonzero(~poisoned)
    defended = bench_defense.train_and_measure(material, images[clean], [captions[k] for k in clean],
                                               {"sig": triggered}, seed)
    assert attacked["asr"]["sig"] > 0.5, attacked
    assert defended["asr"]["sig"] < 0.1, defended
    # The towers learned the task itself (chance R@5 is 5 / 120 captions).
    assert defended["r5"] > 0.15 and attacked["r5"] > 0.1, (attacked, defended)
