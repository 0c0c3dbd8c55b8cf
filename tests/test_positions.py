"""Direct tests of `interplab.positions`: which tokens each selection picks."""

import pytest
import torch

from interplab.positions import MODES, Positions, as_positions

# two rows: row 0 is a 4-token prompt plus 2 generated tokens; row 1 is a 2-token prompt,
# left-padded twice (-1), plus 2 generated tokens
POSITIONS = torch.tensor([[0, 1, 2, 3, 4, 5], [-1, -1, 0, 1, 2, 3]])
PROMPT_LEN = torch.tensor([4, 2])


def picked(spec) -> list[list[int]]:
    mask = as_positions(spec).mask(POSITIONS, PROMPT_LEN)
    return [[int(p) for p, m in zip(row, keep) if m] for row, keep in zip(POSITIONS, mask)]


@pytest.mark.parametrize("spec, expected", [
    (None, [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3]]),
    ("all", [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3]]),
    ("prompt", [[0, 1, 2, 3], [0, 1]]),
    ("generated", [[4, 5], [2, 3]]),
    (-1, [[3], [1]]),  # the last prompt token of each row
    ([0, -1], [[0, 3], [0, 1]]),
    (slice(1, 3), [[1, 2], [1, 2]]),
    (slice(-2, None), [[2, 3, 4, 5], [0, 1, 2, 3]]),
    (Positions.from_(-1), [[3, 4, 5], [1, 2, 3]]),
    (Positions.first(2), [[0, 1], [0, 1]]),
    (Positions.span(None, -1), [[0, 1, 2], [0]]),
    (7, [[], []]),
])
def test_selections_are_absolute_and_skip_padding(spec, expected):
    assert picked(spec) == expected


def test_shorthands_become_values():
    assert as_positions(None) == Positions.all() == as_positions("all")
    assert as_positions(3) == Positions.at(3)
    assert as_positions([1, 2]) == Positions.at(1, 2)
    assert as_positions(slice(2, 5)) == Positions.span(2, 5)
    spec = Positions.from_(2)
    assert as_positions(spec) is spec
    with pytest.raises(AttributeError):
        spec.start = 3  # frozen


@pytest.mark.parametrize("spec, match", [
    ("bogus", r"'bogus' is not a known selection; named selections are 'all', 'prompt', 'generated'"),
    (True, "bool"),
    (1.5, "not understood"),
    ([1, "2"], "not understood"),
    ([], "not understood"),
    (slice(0, 4, 2), "step"),
    pytest.param(slice(0.5, 2), "start must be an int", marks=pytest.mark.wrong_types),
])
def test_bad_shorthands_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        as_positions(spec)


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown positions mode 'last'; valid modes are " + ", ".join(MODES)):
        Positions("last")
    with pytest.raises(ValueError, match="at least one"):
        Positions.at()
    with pytest.raises(ValueError, match="only apply to mode 'range'"):
        Positions("all", start=2)
    with pytest.raises(ValueError, match="must be ints"):
        Positions.at(True)


def test_after_a_marker_is_found_in_each_rows_prompt():
    # row 0: tokens 5 7 8 9 (marker 7 8 ends at position 2); row 1: pad pad 7 8 (ends at 1)
    prompt_ids = torch.tensor([[5, 7, 8, 9, 0, 0], [0, 0, 7, 8, 0, 0]])
    prompt_positions = torch.tensor([[0, 1, 2, 3, -1, -1], [-1, -1, 0, 1, -1, -1]])
    spec = Positions.after((7, 8))
    mask = spec.mask(POSITIONS, PROMPT_LEN, prompt_ids, prompt_positions)
    got = [[int(p) for p, m in zip(row, keep) if m] for row, keep in zip(POSITIONS, mask)]
    assert got == [[3, 4, 5], [2, 3]]
    back = Positions.after((7, 8), -2).mask(POSITIONS, PROMPT_LEN, prompt_ids, prompt_positions)
    assert [[int(p) for p, m in zip(row, keep) if m] for row, keep in zip(POSITIONS, back)] == \
        [[1, 2, 3, 4, 5], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match=r"row 1 does not contain the token sequence \[9\]"):
        Positions.after((9,)).mask(POSITIONS, PROMPT_LEN, prompt_ids, prompt_positions)
    with pytest.raises(ValueError, match="token ids"):
        spec.mask(POSITIONS, PROMPT_LEN)
