"""decoding.step.cat_rows against torch.cat: a view where the rows lie one after another in one tensor,
a copy otherwise, and the same values either way."""

import pytest
import torch

from counterpoint.decoding.step import cat_rows

BASE = torch.arange(6 * 8, dtype=torch.float32).view(6, 8)


def _shares(out: torch.Tensor, base: torch.Tensor) -> bool:
    return out.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


@pytest.mark.parametrize("parts", [
    [BASE[i : i + 1] for i in range(6)],
    [BASE[1:2], BASE[2:4], BASE[4:5]],
    [BASE[3:4]],
])
def test_adjacent_rows_are_a_view_with_torch_cat_values(parts):
    out = cat_rows(parts)
    assert torch.equal(out, torch.cat(parts))
    assert _shares(out, BASE)


@pytest.mark.parametrize("parts", [
    [BASE[2:3], BASE[1:2]],  # out of order
    [BASE[0:1], BASE[2:3]],  # a gap
    [BASE[0:1], BASE.clone()[1:2]],  # another tensor
    [BASE[0:1, :4], BASE[1:2, :4]],  # rows narrower than their stride
    [BASE.t()[0:1], BASE.t()[1:2]],  # not row-major
])
def test_other_rows_are_copied_with_torch_cat_values(parts):
    out = cat_rows(parts)
    assert torch.equal(out, torch.cat(parts))
    assert not _shares(out, BASE)


def test_rows_of_two_widths_raise_as_torch_cat_does():
    with pytest.raises(RuntimeError):
        torch.cat([BASE[0:1], BASE[1:2, :4]])
    with pytest.raises(RuntimeError):
        cat_rows([BASE[0:1], BASE[1:2, :4]])
