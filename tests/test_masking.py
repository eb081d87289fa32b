"""MAE masking and loss targets: what the encoder sees, at the sizes the small configs use.

Mask convention: 1 = hidden. An image of S x S pixels in G groups: with G = S one group is
one image row (16 x 16 px, 16 groups), with G = S / 2 two rows (32 x 32 px, 16 groups).
"""

from __future__ import annotations

import pytest
import torch

from models import create_model
from models.mae import (
    MASK_KINDS,
    MaskedAutoencoder,
    grouped_mask,
    normalise_target,
    per_group_mask,
)
from pipeline.train.config import MaeSection


def _visible_columns(mask: torch.Tensor, side: int) -> torch.Tensor:
    """mask (B, S*S), 1 = hidden -> (B,) number of image columns with a visible pixel."""
    visible = (mask.view(-1, side, side) == 0).any(dim=1)  # (B, S): any row sees column x
    return visible.sum(dim=1).float()


def _default_masks(side: int, groups: int, batch: int = 64) -> torch.Tensor:
    """The masks the default MAE config draws for S x S images in `groups` groups."""
    cfg = MaeSection()
    model = create_model("hip_tiny", inputs={"image": (side * side, 3)}, task="mae",
                         mask_ratio=cfg.mask_ratio, masking=cfg.masking,
                         groups=(groups, 1, groups), latents=(16, 32, 16))
    torch.manual_seed(0)
    return model.make_masks(batch, torch.device("cpu"))["image"][1]


@pytest.mark.parametrize("side, groups", [(16, 16), (32, 16)])
def test_the_default_mask_covers_every_column_and_row(side, groups):
    mask = _default_masks(side, groups)
    assert MaeSection().masking == "per_group"
    hidden = mask.view(-1, groups, side * side // groups).sum(-1)
    assert (hidden == hidden[:, :1]).all()  # the same hidden count in every group
    # 85% hidden leaves 2 visible pixels per 16-px row: "groupwise" would show the same 2
    # columns in every row; independent draws show ~14 of 16 columns per image.
    cols = _visible_columns(mask, side)
    assert cols.mean() >= 0.8 * side, cols.mean()
    # Over a batch every column and every row is seen somewhere.
    seen = (mask.view(-1, side, side) == 0)
    assert seen.any(dim=0).any(dim=0).all() and seen.any(dim=0).any(dim=1).all()


def test_groupwise_masking_hides_whole_columns_when_a_group_is_one_row():
    """The degenerate case the default avoids, pinned down so the docs stay true."""
    _, mask = grouped_mask(64, 256, 16, 0.85, shared=True,
                           generator=torch.Generator().manual_seed(0))
    assert (_visible_columns(mask, 16) == 2).all()  # 2 visible columns, the same in all rows


def test_per_group_mask_draws_every_group_independently_and_is_seeded():
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    ids, mask = per_group_mask(4, 64, 4, 0.75, generator=gen(1))
    groups = mask.view(4, 4, 16)
    assert (groups.sum(-1) == 12).all()  # 4 of 16 visible in every group
    assert ids.shape == (4, 16) and (ids.diff(dim=1) > 0).all()  # raster order kept
    differ = [(groups[b] != groups[b, :1]).any() for b in range(4)]
    assert all(differ)  # groups of one example do not share their positions
    again, _ = per_group_mask(4, 64, 4, 0.75, generator=gen(1))
    other, _ = per_group_mask(4, 64, 4, 0.75, generator=gen(2))
    assert torch.equal(ids, again) and not torch.equal(ids, other)


def test_per_group_mask_on_a_length_that_does_not_divide_stays_rectangular():
    ids, mask = per_group_mask(3, 10, 3, 0.5, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (3, 3 * 2) and mask.shape == (3, 10)  # ceil(10/3)=4 per group, keep 2
    assert (ids // 4 == torch.arange(3).repeat_interleave(2)).all()  # 2 ids in each group


def _mae(masking: str, target_norm: str = "none", side: int = 8) -> MaskedAutoencoder:
    torch.manual_seed(0)
    model = create_model("hip_tiny", inputs={"image": (side * side, 3)}, task="mae",
                         mask_ratio=0.75, masking=masking, target_norm=target_norm)
    # A non-zero output layer, so the loss depends on the prediction (it starts at zero).
    for p in model.backbone.output.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.mark.parametrize("masking", MASK_KINDS)
@pytest.mark.parametrize("target_norm", ["none", "token", "group"])
def test_mae_loss_is_the_mse_of_the_prediction_on_hidden_positions(masking, target_norm):
    model = _mae(masking, target_norm)
    x = {"image": torch.randn(3, 64, 3) * 2 + 1}
    loss, pred, mask = model(x, generator=torch.Generator().manual_seed(3))
    target = normalise_target(x["image"], target_norm, model.backbone.groups[0])
    per_pos = (pred["image"] - target).pow(2).mean(-1)
    expected = (per_pos * mask["image"]).sum() / mask["image"].sum()
    torch.testing.assert_close(loss, expected)
    assert int(mask["image"].sum()) == 3 * 48  # 75% of 64 hidden in each example
    loss.backward()  # every kind trains end to end
    assert model.backbone.output.unembed["image"].weight.grad.abs().sum() > 0


def test_target_norms_standardise_what_they_name():
    x = torch.randn(2, 32, 3) * 5 + 7
    tok = normalise_target(x, "token", groups=4)
    torch.testing.assert_close(tok.mean(-1), torch.zeros(2, 32), atol=1e-4, rtol=0)
    grp = normalise_target(x, "group", groups=4).view(2, 4, 8 * 3)
    torch.testing.assert_close(grp.mean(-1), torch.zeros(2, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(grp.std(-1, unbiased=False), torch.ones(2, 4), atol=1e-3,
                               rtol=0)
    assert normalise_target(x, "none", groups=4) is x
    silent = torch.zeros(1, 32, 1)  # a silent (zero-padded) audio group stays zero
    assert torch.equal(normalise_target(silent, "group", groups=4), silent)
