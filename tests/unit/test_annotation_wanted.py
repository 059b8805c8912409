"""The daemon's list of slices to annotate: the least confident segmentations of the run."""

from __future__ import annotations

from kintsugi_daemon.states.annotation import LeastConfident


def test_keeps_the_least_confident_slices_and_announces_newcomers() -> None:
    queue = LeastConfident(size=3)
    confidences = {0: 0.95, 1: 0.80, 2: 0.99, 3: 0.60, 4: 0.97, 5: 0.70}
    announced = []
    for index, conf in confidences.items():
        wanted = queue.offer(index, conf)
        if wanted is not None:
            announced.append((index, wanted["rank"]))
    assert [x["slice"] for x in queue.slices()] == [3, 5, 1]  # lowest confidence first
    # slices 0-2 fill the list, 3 and 5 displace the most confident; 4 (0.97) never enters
    assert announced == [(0, 1), (1, 1), (2, 3), (3, 1), (5, 2)]
    assert queue.offer(3, 0.1) is None  # a slice segmented again is not announced twice
    assert queue.offer(6, None) is None  # no confidence (a labels-only model): nothing to rank
