"""data.augment: per-example shifts and mirrors of uint8 images and video clips, and time
shifts of audio clips."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.augment import augment, shift_and_flip, time_shift
from pipeline.train.config import Augment, TrainConfig


def _dots(b: int, h: int = 9, w: int = 9, frames: int | None = None) -> torch.Tensor:
    """(B, [F,] H, W, 3) black images with one white pixel at the centre."""
    shape = (b, *(() if frames is None else (frames,)), h, w, 3)
    x = torch.zeros(shape, dtype=torch.uint8)
    x[..., h // 2, w // 2, :] = 255
    return x


def _where(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) -> (B, 2) row/column of each image's white pixel."""
    flat = x[..., 0].flatten(1).argmax(1)
    return torch.stack([flat // x.shape[-2], flat % x.shape[-2]], 1)


def test_every_image_moves_by_its_own_offset_within_the_bound():
    torch.manual_seed(0)
    x = _dots(256)
    out = shift_and_flip(x, 2, False)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    moved = _where(out) - torch.tensor([4, 4])
    assert moved.abs().max() == 2  # never further than `shift`...
    assert len({tuple(m) for m in moved.tolist()}) == 25  # ...and every offset in [-2, 2]^2
    assert (out.flatten(1).sum(1) == 3 * 255).all()  # the dot is moved, not lost or doubled


def test_edges_repeat_into_the_gap_and_mirrors_reverse_columns():
    torch.manual_seed(1)
    x = torch.arange(5, dtype=torch.uint8).reshape(1, 1, 5, 1).expand(64, 5, 5, 3).contiguous()
    out = shift_and_flip(x, 1, False)[..., 0]  # each row of an image reads 0 1 2 3 4, moved
    firsts = {tuple(r) for r in out[:, 0].tolist()}
    assert firsts == {(0, 0, 1, 2, 3), (0, 1, 2, 3, 4), (1, 2, 3, 4, 4)}
    flipped = shift_and_flip(x, 0, True)[..., 0][:, 0]
    rows = {tuple(r) for r in flipped.tolist()}
    assert rows == {(0, 1, 2, 3, 4), (4, 3, 2, 1, 0)}


def test_video_frames_of_a_clip_move_alike_and_the_seed_fixes_the_draw():
    x = _dots(32, frames=3)
    torch.manual_seed(5)
    out = shift_and_flip(x, 3, True)
    for f in range(1, 3):
        assert torch.equal(out[:, f], out[:, 0])
    torch.manual_seed(5)
    assert torch.equal(shift_and_flip(x, 3, True), out)  # same step seed, same augmentation


def test_augment_touches_only_pixel_columns_and_is_off_by_default():
    assert TrainConfig().data.augment == Augment(shift=0, flip=False, time_shift=0.0)
    x, labels = _dots(4), torch.arange(4)
    same = augment({"image": x, "label": labels}, Augment())
    assert same["image"] is x
    torch.manual_seed(0)
    out = augment({"image": _dots(64), "label": labels, "audio": torch.ones(4, 8)},
                  Augment(shift=3))
    assert out["label"] is labels and torch.equal(out["audio"], torch.ones(4, 8))
    assert not torch.equal(out["image"], _dots(64))
    with pytest.raises(ValueError):
        Augment(shift=-1)


def _clicks(b: int, t: int = 100, dtype=torch.int16) -> torch.Tensor:
    """(B, T) silent clips with one full-scale click at T // 2 and a quieter one at 10."""
    x = torch.zeros(b, t, dtype=dtype)
    x[:, t // 2] = 32767 if dtype == torch.int16 else 1.0
    x[:, 10] = 1000 if dtype == torch.int16 else 0.03
    return x


@pytest.mark.parametrize("dtype", [torch.int16, torch.float32])
def test_each_clip_moves_by_its_own_offset_and_silence_fills_the_gap(dtype):
    torch.manual_seed(0)
    x = _clicks(512, dtype=dtype)
    out = time_shift(x, 0.2)  # up to 20 samples of 100, either way
    assert out.dtype == dtype and out.shape == x.shape
    moved = out.abs().float().argmax(1) - 50  # where the loud click went
    assert moved.abs().max() == 20 and len(set(moved.tolist())) == 41  # every offset drawn
    quiet = (out.abs().float() > 0).sum(1) - 1  # the quiet click at 10 survives moves >= -10
    assert torch.equal(quiet, (moved >= -10).long())
    assert set(out.unique().tolist()) <= set(x.unique().tolist())  # samples moved, not mixed
    torch.manual_seed(0)
    assert torch.equal(time_shift(x, 0.2), out)  # same step seed, same shifts
    assert time_shift(x, 0.001) is x  # under one sample: nothing to do


def test_augment_shifts_audio_only_when_asked():
    torch.manual_seed(0)
    x, labels = _clicks(64), torch.arange(64)
    assert augment({"audio": x, "label": labels}, Augment(shift=3))["audio"] is x
    out = augment({"audio": x, "label": labels}, Augment(time_shift=0.3))
    assert out["label"] is labels and not torch.equal(out["audio"], x)
    with pytest.raises(ValueError):
        Augment(time_shift=1.0)
