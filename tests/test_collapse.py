from stalerl.collapse import collapse_step, moving_average


def test_moving_average_is_trailing():
    assert moving_average([1, 2, 3, 4], 2).tolist() == [1.0, 1.5, 2.5, 3.5]


def test_collapse_step_known_curves():
    rising = [0.1 + 0.001 * t for t in range(100)]
    assert collapse_step(rising, window=5, threshold=0.02, min_tail=5) is None
    collapsed = [0.2] * 40 + [0.0] * 60
    # The trailing mean of 5 first drops below 0.02 once all five values are 0: step 44.
    assert collapse_step(collapsed, window=5, threshold=0.02, min_tail=5) == 44
    # A dip that recovers is not a collapse; a final dip shorter than min_tail is censored.
    dip = [0.2] * 40 + [0.0] * 20 + [0.2] * 40
    assert collapse_step(dip, window=5, threshold=0.02, min_tail=5) is None
    late = [0.2] * 95 + [0.0] * 8
    assert collapse_step(late, window=5, threshold=0.02, min_tail=10) is None
    assert collapse_step([], window=5, threshold=0.02, min_tail=1) is None
