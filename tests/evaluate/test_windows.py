from __future__ import annotations

import pytest

from kiln.errors import ConfigError
from kiln.evaluate.windows import Window, sliding_windows


def test_strided_windows_score_each_token_once_by_hand():
    # 10 tokens, window 4, stride 2: the first window predicts tokens 1..3 from 0..2; each later
    # window scores only its last 2 tokens, with 2 tokens of context before them.
    assert sliding_windows(10, 4, 2) == [
        Window(0, 4, 3),
        Window(2, 6, 2),
        Window(4, 8, 2),
        Window(6, 10, 2),
    ]


def test_last_window_is_cut_to_the_text_and_scores_only_new_tokens():
    # 9 tokens: the last window [6, 9) is short and scores tokens 8 only (7 was scored before).
    ws = sliding_windows(9, 4, 2)
    assert ws[-1] == Window(6, 9, 1)
    assert [w.first_target for w in ws] == [1, 4, 6, 8]
    assert sum(w.scored for w in ws) == 8


@pytest.mark.parametrize(("n", "window", "stride"), [(2, 2, 1), (100, 16, 16), (101, 16, 5)])
def test_every_token_but_the_first_is_scored_exactly_once(n, window, stride):
    targets = [t for w in sliding_windows(n, window, stride) for t in range(w.first_target, w.end)]
    assert targets == list(range(1, n))
    assert all(w.end - w.begin <= window for w in sliding_windows(n, window, stride))


def test_text_shorter_than_a_window_is_one_window():
    assert sliding_windows(5, 256, 128) == [Window(0, 5, 4)]


@pytest.mark.parametrize(("n", "window", "stride"), [(10, 1, 1), (10, 4, 5), (10, 4, 0), (1, 4, 2)])
def test_bad_plans_are_refused(n, window, stride):
    with pytest.raises(ConfigError):
        sliding_windows(n, window, stride)
