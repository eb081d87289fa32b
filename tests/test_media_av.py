"""pipeline.data.media audio and video on real files encoded here: shapes, values, a reason
for every bad file."""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest
import soundfile as sf
from media_files import (
    BLUE,
    GREEN,
    RED,
    assert_fresh,
    assert_reason,
    av_audio_bytes,
    grey_frames,
    image_bytes,
    peak_hz,
    tone,
    video_bytes,
    wav_bytes,
    whole_file_audio,
)
from PIL import Image
from scipy.signal import resample_poly

from pipeline.data import media
from pipeline.data.media import audio as audio_module
from pipeline.data.media import video as video_module


@pytest.fixture(scope="module")
def clip_with_audio() -> bytes:
    return video_bytes(grey_frames(10), audio=tone(440, 16_000, 1.25))


# ---------------------------------------------------------------------------------- audio


def test_int16_audio_storage_rounds_clips_and_training_reads_it_back_within_half_a_step():
    import torch

    from pipeline.data.decode import to_int16
    from pipeline.train.batches import to_model_input

    x = np.array([0.0, 1.0, -1.0, 1.5, -2.0, 0.5 / 32767, 1.5 / 32767, -0.25], np.float32)
    q = to_int16(x)
    assert q.dtype == np.int16
    assert q.tolist() == [0, 32767, -32767, 32767, -32767, 0, 2, -8192]
    # What preprocessing stores (to_int16) -> what training feeds the model (to_model_input):
    # the clipped signal to within half a quantisation step. A scale that differs between
    # the two by even one count (32768) is off by up to a whole step near full scale.
    signal = np.concatenate([x, np.random.default_rng(0).uniform(-1, 1, 2000)]
                            ).astype(np.float32)
    stored = torch.from_numpy(np.stack([to_int16(signal), to_int16(-signal)]))
    back = to_model_input({"audio": stored}, {"audio": (len(signal), 1)})["audio"]
    assert back.dtype == torch.float32 and back.shape == (2, len(signal), 1)
    want = np.clip(signal, -1, 1)
    half_step = 0.5 / 32767
    np.testing.assert_allclose(back[0, :, 0].numpy(), want, rtol=0, atol=half_step * 1.001)
    np.testing.assert_allclose(back[1, :, 0].numpy(), -want, rtol=0, atol=half_step * 1.001)


def test_wav_int16_same_rate_is_exact_and_padded():
    x = tone(500, 16_000, 0.5)
    out = media.decode_audio(wav_bytes(x, 16_000), sample_rate=16_000, num_samples=10_000)
    assert out.shape == (10_000,) and out.dtype == np.float32
    assert_fresh(out)
    np.testing.assert_allclose(out[:8_000], x, atol=1 / 32_768)
    assert not out[8_000:].any()  # zero padding at the end


def test_centre_crop_without_resampling():
    ramp = np.linspace(-0.9, 0.9, 1_000, dtype=np.float32)
    data = wav_bytes(ramp, 8_000, subtype="FLOAT")
    out = media.decode_audio(data, sample_rate=8_000, num_samples=200)
    np.testing.assert_array_equal(out, ramp[400:600])


def test_float_wav_is_clipped_and_cleaned():
    x = np.array([2.0, -3.0, np.nan, 0.25] * 100, np.float32)
    out = media.decode_audio(wav_bytes(x, 8_000, subtype="FLOAT"), sample_rate=8_000, num_samples=8)
    np.testing.assert_array_equal(out, [1.0, -1.0, 0.0, 0.25] * 2)


def test_stereo_is_averaged_to_mono():
    stereo = np.stack([np.full(4_000, 0.5), np.full(4_000, 0.1)], 1).astype(np.float32)
    out = media.decode_audio(wav_bytes(stereo, 8_000, subtype="FLOAT"), sample_rate=8_000)
    np.testing.assert_allclose(out[:4_000], 0.3, atol=1e-6)


@pytest.mark.parametrize(("rate_in", "rate_out"), [(44_100, 48_000), (48_000, 16_000)])
def test_resampling_length_pitch_and_padding(rate_in, rate_out):
    data = wav_bytes(tone(1_000, rate_in, 1.0), rate_in)
    out = media.decode_audio(data, sample_rate=rate_out, num_samples=rate_out + 500)
    assert out[:-500].std() > 0.3 and not out[-500:].any()  # 1 s of signal, then zeros
    assert abs(peak_hz(out[: rate_out // 2], rate_out) - 1_000) <= 2


@pytest.mark.parametrize(("rate_in", "rate_out"),
                         [(22_050, 48_000), (44_100, 48_000), (48_000, 16_000)])
def test_windowed_resampling_equals_resample_then_crop(rate_in, rate_out):
    """Also pins the cached low-pass filter to resample_poly's own default design."""
    x = np.random.default_rng(1).uniform(-0.5, 0.5, 3 * rate_in).astype(np.float32)
    data = wav_bytes(x, rate_in, subtype="FLOAT")
    out = media.decode_audio(data, sample_rate=rate_out, num_samples=20_000)
    g = np.gcd(rate_in, rate_out)
    full = resample_poly(x, rate_out // g, rate_in // g)
    start = (len(full) - 20_000) // 2
    np.testing.assert_allclose(out, np.clip(full[start : start + 20_000], -1, 1), atol=1e-5)


@pytest.mark.parametrize(
    ("fmt", "subtype"), [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")]
)
def test_compressed_audio(fmt, subtype):
    if fmt not in sf.available_formats():
        pytest.skip(f"libsndfile here cannot write {fmt}")
    data = wav_bytes(tone(880, 16_000, 1.0), 16_000, fmt=fmt, subtype=subtype)
    out = media.decode_audio(data, sample_rate=16_000, num_samples=16_000)
    assert out.shape == (16_000,) and out.dtype == np.float32
    assert abs(peak_hz(out, 16_000) - 880) <= 2
    assert 0.3 < np.abs(out).max() <= 0.6


def test_m4a_goes_through_pyav():
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="ipod") as container:
        stream = container.add_stream("aac", rate=22_050, layout="stereo")
        x = tone(440, 22_050, 1.0)
        interleaved = np.stack([x, x], 1).reshape(1, -1)  # (1, T * C) packed stereo
        frame = av.AudioFrame.from_ndarray(interleaved, format="flt", layout="stereo")
        frame.sample_rate, frame.pts = 22_050, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    out = media.decode_audio(buffer.getvalue(), sample_rate=16_000, num_samples=16_000)
    assert abs(peak_hz(out, 16_000) - 440) <= 2
    assert 0.4 < np.abs(out).max() <= 0.6  # averaged, not summed


def _noise(channels: int, seconds: float, rate: int) -> np.ndarray:
    """(channels, T) float32 in [-0.5, 0.5]."""
    x = np.random.default_rng(2).uniform(-0.5, 0.5, (channels, round(seconds * rate)))
    return x.astype(np.float32)


WINDOWED_FILES = {  # name -> bytes: each decoder path (seek, read through, count + decode)
    "wav-3ch": lambda: wav_bytes(_noise(3, 8, 44_100).T, 44_100),
    "flac-24bit": lambda: wav_bytes(_noise(2, 8, 44_100).T, 44_100, fmt="FLAC", subtype="PCM_24"),
    "ogg-vorbis": lambda: wav_bytes(_noise(2, 8, 44_100).T, 44_100, fmt="OGG", subtype="VORBIS"),
    "mp3": lambda: wav_bytes(_noise(2, 8, 44_100).T, 44_100, fmt="MP3",
                             subtype="MPEG_LAYER_III"),
    "m4a-aac": lambda: av_audio_bytes(
        np.stack([tone(440, 44_100, 8), tone(660, 44_100, 8)]), 44_100,
        fmt="ipod", codec="aac", layout="stereo"),
    "mkv-opus": lambda: av_audio_bytes(_noise(2, 8, 48_000), 48_000, fmt="matroska",
                                       codec="libopus", layout="stereo"),
    "mp4-flac": lambda: av_audio_bytes(_noise(1, 8, 48_000), 48_000, fmt="mp4", codec="flac",
                                       layout="mono"),
}


@pytest.mark.parametrize("name", list(WINDOWED_FILES))
@pytest.mark.parametrize(("rate_out", "num_samples"), [(48_000, 122_880), (16_000, 40_960),
                                                        (16_000, 16_000 * 10)])
def test_windowed_decode_equals_decoding_the_whole_file(name, rate_out, num_samples):
    """Decoding only the window (seek, or read up to it) gives what decoding every sample,
    resampling it all and cropping gave; the last case pads a file shorter than the crop."""
    data = WINDOWED_FILES[name]()
    out = media.decode_audio(data, sample_rate=rate_out, num_samples=num_samples)
    want = whole_file_audio(data, sample_rate=rate_out, num_samples=num_samples)
    np.testing.assert_allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("name", ["mp3", "mkv-opus"])
def test_second_pass_equals_keeping_the_whole_head(name, monkeypatch):
    """Streams of unknown length are decoded once when short; longer ones twice."""
    data = WINDOWED_FILES[name]()
    once = media.decode_audio(data, sample_rate=16_000, num_samples=40_960)
    monkeypatch.setattr(audio_module, "_HEAD_BYTES", 0)
    np.testing.assert_array_equal(
        media.decode_audio(data, sample_rate=16_000, num_samples=40_960), once)


def test_truncation_after_the_window_is_still_corrupt():
    flac = wav_bytes(_noise(1, 20, 8_000)[0], 8_000, fmt="FLAC")
    cut = flac[: len(flac) * 7 // 10]  # the centre 2.56 s are intact, the header says 20 s
    assert_reason("corrupt", media.decode_audio, cut)


def test_channels_over_max_channels_are_too_large():
    five = wav_bytes(_noise(5, 0.5, 8_000).T, 8_000)
    err = assert_reason("too_large", media.decode_audio, five, max_channels=4)
    assert "5 channels" in err.detail
    assert media.decode_audio(five, max_channels=5).any()
    surround = av_audio_bytes(_noise(3, 0.5, 48_000), 48_000, fmt="matroska", codec="flac",
                              layout="2.1")  # through FFmpeg
    assert_reason("too_large", media.decode_audio, surround, max_channels=2)
    assert media.decode_audio(surround, max_channels=3).any()
    stereo_clip = video_bytes(grey_frames(2), audio=np.stack([tone(440, 16_000, 0.5)] * 2))
    assert_reason("too_large", media.decode_video, stereo_clip, with_audio=True, max_channels=1)
    assert media.decode_video(stereo_clip, max_channels=1)[2]  # the track is not decoded
    assert media.decode_video(stereo_clip, with_audio=True, max_channels=2)[2]


def test_min_samples_counts_after_resampling():
    data = wav_bytes(tone(200, 8_000, 0.125), 8_000)  # 1000 samples -> 2000 at 16 kHz
    assert media.decode_audio(data, sample_rate=16_000, num_samples=100, min_samples=2_000).any()
    err = assert_reason(
        "too_short", media.decode_audio, data, sample_rate=16_000, min_samples=2_001
    )
    assert "2000" in err.detail


def test_bad_audio(clip_with_audio):
    text = b"this is a text file named sound.wav\n" * 5
    assert_reason("empty_file", media.decode_audio, b"")
    assert_reason("not_media", media.decode_audio, text)
    assert_reason("not_media", media.decode_audio, image_bytes(Image.new("RGB", (8, 8)), "PNG"))
    assert_reason("not_media", media.decode_audio, video_bytes(grey_frames(2)))  # no audio track
    assert_reason("no_samples", media.decode_audio, wav_bytes(np.zeros(0, np.float32), 8_000))
    wav = wav_bytes(tone(300, 8_000, 1.0), 8_000)
    assert_reason("corrupt", media.decode_audio, wav[:30])  # cut inside the header
    assert_reason("corrupt", media.decode_audio, wav[: len(wav) // 2])  # cut inside the data
    flac = wav_bytes(np.random.default_rng(0).uniform(-1, 1, 8_000), 8_000, fmt="FLAC")
    assert_reason("corrupt", media.decode_audio, flac[: len(flac) // 2])
    assert_reason("corrupt", media.decode_audio, clip_with_audio[: len(clip_with_audio) // 2])


# ---------------------------------------------------------------------------------- video


def test_video_frames_are_sampled_uniformly(clip_with_audio):
    frames, audio, has_audio = media.decode_video(clip_with_audio, num_frames=4, size=16)
    assert frames.shape == (4, 16, 16, 3) and frames.dtype == np.uint8
    assert_fresh(frames)
    assert audio is None and has_audio  # the track exists, but was not asked for
    expected = 20 + 25 * np.array([0, 3, 6, 9])  # linspace(0, 9, 4).round()
    np.testing.assert_allclose(frames.mean((1, 2, 3)), expected, atol=4)


def test_video_with_audio_track(clip_with_audio):
    frames, audio, has_audio = media.decode_video(
        clip_with_audio, num_frames=3, size=8, with_audio=True, sample_rate=8_000, num_samples=6_000
    )
    assert frames.shape == (3, 8, 8, 3)
    assert audio.shape == (6_000,) and audio.dtype == np.float32 and has_audio
    assert_fresh(audio)
    assert abs(peak_hz(audio, 8_000) - 440) <= 2
    assert 0.4 < np.abs(audio).max() <= 0.6


def test_video_without_audio_track():
    data = video_bytes(grey_frames(3))
    frames, audio, has_audio = media.decode_video(data, num_frames=5, size=8, with_audio=True)
    assert frames.shape == (5, 8, 8, 3)  # more frames asked than exist: indices repeat
    np.testing.assert_allclose(frames.mean((1, 2, 3)), 20 + 25 * np.array([0, 0, 1, 2, 2]), atol=4)
    assert audio.shape == (122_880,) and not audio.any() and not has_audio
    assert media.decode_video(data, size=8)[1:] == (None, False)


def test_video_centre_crop():
    frames = np.zeros((2, 64, 128, 3), np.uint8)
    frames[:, :, :32] = RED
    frames[:, :, 32:96] = GREEN
    frames[:, :, 96:] = BLUE
    out, _, _ = media.decode_video(video_bytes(frames), num_frames=2, size=16)
    np.testing.assert_allclose(out[:, 2:-2, 2:-2].reshape(-1, 3).mean(0), GREEN, atol=12)


@pytest.mark.parametrize(
    ("fmt", "codec"),
    [("mp4", "libx264"), ("webm", "libvpx-vp9"), ("matroska", "mpeg4")],
    ids=["h264", "webm-no-frame-count", "mkv"],
)
def test_other_codecs_and_containers(fmt, codec):
    if codec not in av.codecs_available:
        pytest.skip(f"no {codec} encoder in this PyAV build")
    data = video_bytes(grey_frames(6, step=40), fmt=fmt, codec=codec)
    frames, _, _ = media.decode_video(data, num_frames=6, size=8)
    np.testing.assert_allclose(frames.mean((1, 2, 3)), 20 + 40 * np.arange(6), atol=4)


def test_bad_video(clip_with_audio):
    assert_reason("empty_file", media.decode_video, b"")
    assert_reason("not_media", media.decode_video, b"not a video, just text named clip.mp4\n" * 4)
    assert_reason("not_media", media.decode_video, wav_bytes(tone(300, 8_000, 0.5), 8_000))
    truncated = clip_with_audio[: len(clip_with_audio) // 2]  # moov (the index) is at the end
    assert_reason("corrupt", media.decode_video, truncated)
    assert_reason("too_large", media.decode_video, clip_with_audio, max_pixels=64 * 48 - 1)


def test_video_with_undecodable_frames(clip_with_audio):
    # Keep the container intact but overwrite every byte of media data (mdat) with garbage.
    start = clip_with_audio.index(b"mdat") + 4
    length = struct.unpack(">I", clip_with_audio[start - 8 : start - 4])[0] - 8
    garbage = clip_with_audio[:start] + b"\xab" * length + clip_with_audio[start + length :]
    err = assert_reason("no_frames", media.decode_video, garbage)
    assert err.detail


@pytest.mark.parametrize(
    ("fmt", "codec"), [("mp4", "mpeg4"), ("mp4", "libx264"), ("matroska", "libx264")],
    ids=["mp4", "h264-bframes", "mkv"])
def test_seeking_to_frames_equals_one_pass(fmt, codec, monkeypatch):
    if codec not in av.codecs_available:
        pytest.skip(f"no {codec} encoder in this PyAV build")
    noise = np.random.default_rng(3).integers(0, 40, (240, 32, 32, 3))
    frames = (grey_frames(240, step=1, h=32, w=32) + noise).astype(np.uint8)
    data = video_bytes(frames, fmt=fmt, codec=codec, gop=12)  # 20 keyframes
    index = video_module._index(data, 0, strict=True)
    wanted = np.linspace(0, 239, 8).round().astype(np.int64)
    assert video_module._seek_pays(index, wanted)  # 8 seeks decode <= 96 of 240 frames
    seeking, _, _ = media.decode_video(data, num_frames=8, size=16)
    monkeypatch.setattr(video_module, "_seek_pays", lambda *_: False)
    one_pass, _, _ = media.decode_video(data, num_frames=8, size=16)
    np.testing.assert_array_equal(seeking, one_pass)
    short = video_module._index(video_bytes(grey_frames(10)), 0, strict=True)
    assert not video_module._seek_pays(short, np.linspace(0, 9, 8).round().astype(np.int64))


def test_video_audio_track_is_the_window_of_decoding_it_whole():
    fade_in = np.linspace(0, 1, 192_000, dtype=np.float32)
    data = video_bytes(grey_frames(4), audio=tone(440, 16_000, 12.0) * fade_in)
    for rate, n in [(16_000, 40_960), (48_000, 122_880)]:
        _, audio, has_audio = media.decode_video(
            data, num_frames=2, size=8, with_audio=True, sample_rate=rate, num_samples=n)
        assert has_audio
        want = whole_file_audio(data, sample_rate=rate, num_samples=n)
        np.testing.assert_allclose(audio, want, atol=1e-5)
