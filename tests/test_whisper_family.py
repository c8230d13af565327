"""Whisper's encoder as a teacher family and its student (tiny real-config Whisper, no hub)."""

import itertools
import math
import os

import numpy as np
import pytest
import torch
from torch import nn
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from colld_ds.config import ConfigError, load_config
from colld_ds.formats import SAMPLE_RATE, check_teacher_identity
from colld_ds.models import build_student, load_teacher, read_num_layers
from colld_ds.data_prep import cache
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher

S = SAMPLE_RATE
REAL_TINY_EN = os.path.expanduser("~/.cache/colld/whisper-tiny.en-hf")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_teacher("whisper", str(tmp_path_factory.mktemp("tiny") / "whisper"))


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    wave = torch.randn(3, S, generator=generator) * 0.1
    lengths = torch.tensor([S, 12345, 8000])
    return wave.masked_fill(torch.arange(S) >= lengths[:, None], 7.0), lengths  # junk padding


def _hf_features(path, wave):
    """One unpadded utterance through the real WhisperFeatureExtractor: (1, 80, 3000)."""
    extractor = WhisperFeatureExtractor.from_pretrained(path)
    return extractor(wave.numpy(), sampling_rate=S, return_tensors="pt")["input_features"]


def _hf_hidden_states(model, path, wave):
    with torch.no_grad():
        features = _hf_features(path, wave)
        return model(input_features=features, output_hidden_states=True).hidden_states


def _layer_outputs(model, hidden):
    """hidden_states recomputed from hidden_states[L - 1] with layer L (no final LayerNorm)."""
    with torch.no_grad():
        last = model.layers[-1](hidden[-2], None)
    return (*hidden[:-1], last[0] if isinstance(last, tuple) else last)


def test_teacher_loads_only_the_encoder(tiny):
    teacher = load_teacher(tiny, [1, 4])
    assert isinstance(teacher.model, WhisperEncoder)
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert (teacher.hidden_size, teacher.num_layers, read_num_layers(tiny)) == (32, 4, 4)
    identity = teacher.identity
    assert identity["model_type"] == "whisper" and identity["frame_rate"] == 50.0
    # The saved checkpoint is a WhisperForConditionalGeneration: the encoder is its weights.
    from safetensors.torch import load_file

    stored = load_file(os.path.join(tiny, "model.safetensors"))
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(value, stored[f"model.encoder.{key}"]), key


def test_front_end_matches_hf_extractor_and_conv_arithmetic(tiny):
    teacher = load_teacher(tiny, [1])
    wave, lengths = _batch()
    inputs, frame_lengths = teacher.front_end(wave, lengths)
    features = inputs["input_features"]
    assert features.shape == (3, 80, 3000)
    extractor = WhisperFeatureExtractor.from_pretrained(tiny)
    for b, n in enumerate(lengths.tolist()):
        ref = extractor(
            wave[b, :n].numpy(), sampling_rate=S, return_tensors="pt", return_attention_mask=True
        )
        torch.testing.assert_close(features[b : b + 1], ref["input_features"], atol=1e-4, rtol=0)
        mel_valid = int(ref["attention_mask"].sum())
        assert mel_valid == math.ceil(n / 160)
        assert int(frame_lengths[b]) == math.ceil(mel_valid / 2)
        assert int(frame_lengths[b]) == int(
            teacher.model._get_feat_extract_output_lengths(torch.tensor(mel_valid))
        )
    n = torch.arange(0, 3 * S, 7)
    assert torch.equal(teacher.num_frames(n), (n + 319) // 320)  # ceil(ceil(n / 160) / 2)
    assert teacher.front_end.frame_stride == 320
    assert int(teacher.num_frames(torch.tensor(30 * S))) == 1500


@pytest.mark.parametrize("target_kind", ["layer_output", "ffn"])
def test_features_match_hf_encoder_at_valid_frames(tiny, target_kind):
    layers = [4, 1, 2]
    teacher = load_teacher(tiny, layers, target_kind=target_kind)
    wave, lengths = _batch()
    out = teacher(wave, lengths)
    num_frames = int(teacher.num_frames(torch.tensor(S)))
    assert num_frames == 50 and torch.equal(out.frame_lengths, torch.tensor([50, 39, 25]))
    for b, n in enumerate(out.frame_lengths.tolist()):
        hidden = _hf_hidden_states(teacher.model, tiny, wave[b, : lengths[b]])
        assert hidden[0].shape == (1, 1500, 32)
        for layer, feature in zip(layers, out.features, strict=True):
            assert feature.shape == (3, num_frames, 32)
            assert not feature[b, n:].any()
            if target_kind == "layer_output":
                # HF puts the encoder's final LayerNorm into hidden_states[L]; like the other
                # families' layer L, ours is the last layer's own output (no final LayerNorm).
                ref = hidden[layer]
                if layer == 4:
                    with torch.no_grad():
                        normed = teacher.model.layer_norm(feature[b : b + 1, :n])
                    torch.testing.assert_close(normed, ref[:, :n], atol=1e-4, rtol=1e-4)
                    ref = _layer_outputs(teacher.model, hidden)[layer]
            else:  # pre-LN: x + attn(ln(x)); then x + fc2(act(fc1(ln(x)))), ffn = fc2's output
                module = teacher.model.layers[layer - 1]
                with torch.no_grad():
                    h = hidden[layer - 1]
                    h = h + module.self_attn(module.self_attn_layer_norm(h))[0]
                    ref = module.fc2(module.activation_fn(module.fc1(module.final_layer_norm(h))))
                    torch.testing.assert_close(
                        h + ref, _layer_outputs(teacher.model, hidden)[layer], atol=1e-5, rtol=1e-5
                    )
                assert not torch.allclose(ref[0, :n], h[0, :n], atol=1e-3)
            torch.testing.assert_close(feature[b, :n], ref[0, :n], atol=1e-4, rtol=1e-4)


def test_window_limit_is_a_clear_error(tiny):
    teacher = load_teacher(tiny, [1])
    student = build_student(teacher, 1)
    full = torch.randn(1, 30 * S) * 0.1
    out = teacher(full, torch.tensor([30 * S]))  # exactly 30 s is fine
    assert out.features[0].shape == (1, 1500, 32) and int(out.frame_lengths) == 1500
    long = torch.randn(2, 30 * S + 1) * 0.1
    for model in (teacher, student):
        with pytest.raises(ValueError, match=r"30\.00 s.*30 s window \(480000 samples"):
            model(long, torch.tensor([30 * S + 1, S]))
        with pytest.raises(ValueError, match=r"padded batch length.*30 s"):
            model(long, torch.tensor([S, S]))


def test_student_copies_front_end_and_chosen_layers(tiny):
    teacher = load_teacher(tiny, [1])
    student = build_student(teacher, 2, init_from_teacher_layers=[3, 1])
    assert isinstance(student.model, WhisperEncoder)
    config = student.model.config
    assert (config.model_type, config.encoder_layers, config.d_model) == ("whisper", 2, 32)
    assert config.encoder_layerdrop == 0.0 and not config.apply_spec_augment
    assert student.mask_embed.shape == (32,) and student.mask_embed.requires_grad
    assert not any("mask" in key for key in student.model.state_dict())
    t_state, s_state = teacher.model.state_dict(), student.model.state_dict()
    for key, value in s_state.items():
        if key.startswith("layers."):
            index, rest = key[len("layers.") :].split(".", 1)
            assert torch.equal(value, t_state[f"layers.{[2, 0][int(index)]}.{rest}"]), key
            if value.dim() == 2:
                assert not torch.equal(value, t_state[f"layers.{[0, 2][int(index)]}.{rest}"]), key
        else:  # conv1, conv2, embed_positions, layer_norm
            assert torch.equal(value, t_state[key]), key


def test_student_forward_matches_hf_and_the_teacher(tiny):
    teacher = load_teacher(tiny, [1, 3])
    student = build_student(teacher, 2, init_from_teacher_layers=[1, 3]).eval()
    wave, lengths = _batch()
    with torch.no_grad():
        out = student(wave, lengths, None)
    target = teacher(wave, lengths)
    assert torch.equal(out.frame_lengths, target.frame_lengths)
    assert torch.equal(student.num_frames(lengths), teacher.num_frames(lengths))
    for b, n in enumerate(out.frame_lengths.tolist()):
        hidden = _layer_outputs(
            student.model, _hf_hidden_states(student.model, tiny, wave[b, : lengths[b]])
        )
        for k, h in enumerate(out.hidden):
            assert h.shape == (3, 50, 32) and not h[b, n:].any()
            torch.testing.assert_close(h[b, :n], hidden[k + 1][0, :n], atol=1e-4, rtol=1e-4)
    # Student layer 1 is teacher layer 1; student layer 2 is teacher layer 3 on layer 1's output.
    torch.testing.assert_close(out.hidden[0], target.features[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out.hidden[1], target.features[1], atol=1e-3)


def test_narrow_student(tiny):
    teacher = load_teacher(tiny, [1])
    student = build_student(teacher, 3, hidden_size=16)
    config = student.model.config
    sizes = (student.hidden_size, config.encoder_attention_heads, config.encoder_ffn_dim)
    assert sizes == (16, 1, 32)
    assert student.model.conv1.weight.shape == (16, 80, 3) and student.mask_embed.shape == (16,)
    wave, lengths = _batch()
    assert [h.shape for h in student(wave, lengths).hidden] == [(3, 50, 16)] * 3


def test_mask_replaces_only_masked_frames_before_positions(tiny):
    teacher = load_teacher(tiny, [1])
    student = build_student(teacher, 2, init_from_teacher_layers=[1, 2]).train()
    seen = []
    student.model.layers[0].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone())
    )
    wave, lengths = _batch()
    mask = torch.zeros(3, 50, dtype=torch.bool)
    mask[0, 5:15] = mask[1, 20:23] = True
    masked = student(wave, lengths, mask).hidden[-1]
    student(wave, lengths, None)
    with_mask, without = seen  # (B, 1500, D): the first layer's input
    window = nn.functional.pad(mask, (0, 1500 - 50))
    assert torch.equal(with_mask[~window], without[~window])
    positions = student.model.embed_positions.weight.detach()  # (1500, D), sinusoids
    expected = student.mask_embed.detach() + positions  # mask embedding, then positions
    torch.testing.assert_close(with_mask[window], expected.expand(3, -1, -1)[window])
    assert not torch.allclose(with_mask[window], without[window])
    masked.sum().backward()
    assert student.mask_embed.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        student(wave, lengths, torch.zeros(3, 49, dtype=torch.bool))


def test_exported_student_is_the_encoder_and_loads_as_a_teacher(tiny, tmp_path):
    teacher = load_teacher(tiny, [1])
    student = build_student(teacher, 2, init_from_teacher_layers=[2, 4]).eval()
    student.model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(os.path.join(tmp_path, "model.safetensors")))
    assert keys == set(student.model.state_dict()) and "conv1.weight" in keys
    reloaded = load_teacher(str(tmp_path), [1, 2])
    wave, lengths = _batch()
    with torch.no_grad():
        hidden = student(wave, lengths).hidden
    for ours, theirs in zip(hidden, reloaded(wave, lengths).features, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_half_precision_teacher_and_fp32_student(tiny):
    bf16 = load_teacher(tiny, [2], dtype=torch.bfloat16)
    wave, lengths = _batch()
    assert bf16(wave, lengths).features[0].dtype == torch.bfloat16
    student = build_student(bf16, 1, init_from_teacher_layers=[2])
    fp32 = load_teacher(tiny, [1]).model.state_dict()
    s_state = student.model.state_dict()
    assert torch.equal(s_state["layers.0.fc1.weight"], fp32["layers.1.fc1.weight"])


def test_incomplete_checkpoint_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(tiny, "model.safetensors"))
    state = {k: v for k, v in state.items() if "encoder.layers.3." not in k}
    for name in os.listdir(tiny):
        if name != "model.safetensors":
            (tmp_path / name).write_bytes(open(os.path.join(tiny, name), "rb").read())
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layers.3"):
        load_teacher(str(tmp_path), [1])


def test_tiny_whisper_is_deterministic(tmp_path):
    a = load_teacher(make_tiny_teacher("whisper", str(tmp_path / "a"), seed=1), [1])
    b = load_teacher(make_tiny_teacher("whisper", str(tmp_path / "b"), seed=1), [1])
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(np.array_equal(sa[k].numpy(), sb[k].numpy()) for k in sa)


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(REAL_TINY_EN, "config.json")),
    reason=f"no converted Whisper tiny.en at {REAL_TINY_EN} (colld prep convert-whisper makes it)",
)
def test_real_whisper_tiny_en_teacher():
    teacher = load_teacher(REAL_TINY_EN, [1, 4])
    sizes = (teacher.hidden_size, teacher.num_layers, teacher.identity["frame_rate"])
    assert sizes == (384, 4, 50.0)
    t = torch.arange(2 * S) / S
    wave = torch.stack([0.3 * torch.sin(2 * math.pi * 220 * t), 0.05 * torch.randn(2 * S)])
    lengths = torch.tensor([2 * S, S + 500])
    out = teacher(wave, lengths)
    assert torch.equal(out.frame_lengths, torch.tensor([100, 52]))
    for feature in out.features:
        assert feature.shape == (2, 100, 384) and torch.isfinite(feature).all()
        assert feature[0].abs().sum(-1).min() > 0
    student = build_student(teacher, 2, init_from_teacher_layers=[1, 4])
    with torch.no_grad():
        hidden = student.eval()(wave, lengths).hidden
    torch.testing.assert_close(hidden[0], out.features[0], atol=1e-3, rtol=1e-3)


# --- teacher.window_seconds: the encoder on a window shorter than 30 s ---------------------------


def _hf_windowed_reference(path, window_seconds, wave):
    """Independent reference for a shortened window: HF's own WhisperFeatureExtractor with
    ``chunk_length`` = the window, and a fresh HF ``WhisperEncoder`` whose config has
    ``max_source_positions`` = 50 x window, loaded with the checkpoint's weights and the first
    rows of its positional table. Returns the hidden states (L + 1) x (1, W, D)."""
    from transformers import AutoConfig

    full = load_teacher(path, [1]).model
    config = AutoConfig.from_pretrained(path)
    config.max_source_positions = round(window_seconds * 50)
    encoder = WhisperEncoder(config).eval()
    state = dict(full.state_dict())
    state["embed_positions.weight"] = state["embed_positions.weight"][: config.max_source_positions]
    encoder.load_state_dict(state)
    extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins,
                                        chunk_length=window_seconds)
    assert extractor.nb_max_frames == 2 * config.max_source_positions
    features = extractor(wave.numpy(), sampling_rate=S, return_tensors="pt")["input_features"]
    with torch.no_grad():
        return encoder, encoder(input_features=features, output_hidden_states=True).hidden_states


def test_30_s_window_is_the_untouched_encoder(tiny):
    layers = [1, 2, 3]
    untouched = load_teacher(tiny, layers)
    windowed = load_teacher(tiny, layers, window_seconds=30.0)
    assert windowed.identity == untouched.identity and windowed.identity["window_seconds"] == 30
    wave, lengths = _batch()
    out = windowed(wave, lengths)
    for b, n in enumerate(out.frame_lengths.tolist()):
        hidden = _hf_hidden_states(untouched.model, tiny, wave[b, : lengths[b]])  # HF, 1500 frames
        for layer, feature in zip(layers, out.features, strict=True):
            torch.testing.assert_close(feature[b, :n], hidden[layer][0, :n], atol=1e-4, rtol=1e-4)


def test_short_window_pads_to_the_window_and_keeps_valid_frames(tiny):
    full = load_teacher(tiny, [1, 2, 3, 4])
    short = load_teacher(tiny, [1, 2, 3, 4], window_seconds=2.0)
    assert short.front_end.max_seconds == 2.0 and short.front_end.num_encoder_frames == 100
    assert short.model.config.max_source_positions == 100
    assert torch.equal(short.model.embed_positions.weight, full.model.embed_positions.weight[:100])
    wave, lengths = _batch()  # 1 s batch: the 2 s window pads it, 30 s pads it more
    inputs, frame_lengths = short.front_end(wave, lengths)
    assert inputs["input_features"].shape == (3, 80, 200)
    assert torch.equal(frame_lengths, full.front_end(wave, lengths)[1])  # [50, 39, 25]
    n = torch.arange(0, 2 * S, 7)
    assert torch.equal(short.num_frames(n), full.num_frames(n))
    out = short(wave, lengths)
    assert torch.equal(out.frame_lengths, torch.tensor([50, 39, 25]))
    for b, n in enumerate(out.frame_lengths.tolist()):
        encoder, hidden = _hf_windowed_reference(tiny, 2, wave[b, : lengths[b]])
        assert hidden[0].shape == (1, 100, 32)
        for layer, feature in enumerate(out.features[:3], start=1):
            assert feature.shape == (3, 50, 32) and not feature[b, n:].any()
            torch.testing.assert_close(feature[b, :n], hidden[layer][0, :n], atol=1e-4, rtol=1e-4)
        # layer 4 (the last): HF applies the final LayerNorm; ours is the layer's own output
        torch.testing.assert_close(_layer_outputs(encoder, hidden)[4][0, :n],
                                   out.features[3][b, :n], atol=1e-4, rtol=1e-4)
    # A shorter window is another teacher: its features differ from the 30 s window's.
    assert not torch.allclose(out.features[3], full(wave, lengths).features[3], atol=1e-3)


def test_window_is_part_of_the_teacher_identity(tiny):
    identities = {w: load_teacher(tiny, [2], window_seconds=w).identity for w in (None, 2.0, 3.0)}
    hashes = {w: identity["config_hash"] for w, identity in identities.items()}
    assert len(set(hashes.values())) == 3
    assert [identities[w]["window_seconds"] for w in (None, 2.0, 3.0)] == [30.0, 2.0, 3.0]
    check_teacher_identity(identities[2.0], dict(identities[2.0]), "cache")  # same window: fine
    with pytest.raises(ValueError, match=r"different teacher.*\n.*window_seconds\": 2\.0"):
        check_teacher_identity(identities[2.0], identities[3.0], "cache shard x")


def test_utterance_longer_than_the_window_is_a_clear_error(tiny):
    teacher = load_teacher(tiny, [1], window_seconds=1.0)
    student = build_student(teacher, 1)
    exact = torch.randn(1, S) * 0.1
    assert teacher(exact, torch.tensor([S])).features[0].shape == (1, 50, 32)  # fills it exactly
    long = torch.randn(2, S + S // 2) * 0.1
    for model in (teacher, student):
        with pytest.raises(ValueError, match=rf"1\.50 s long.*1 s window \({SAMPLE_RATE} samples.*"
                                             r"teacher\.window_seconds"):
            model(long, torch.tensor([S + S // 2, S]))


@pytest.mark.parametrize("command", ["cache_teacher", "train_codebook"])
def test_cache_refuses_an_utterance_longer_than_the_window_before_any_work(tiny, tmp_path,
                                                                           command):
    short, long = generate_utterances(3, 0, 0.4, 0.9), generate_utterances(1, 1, 1.3, 1.4)
    write_audio_shards(itertools.chain(short, long), str(tmp_path / "audio"), max_count=2,
                       progress=False)
    out_dir = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"utterance gen1-000000 is 1\.3\d s \(in \S+/train-"
                                         r"000001\.tar\), longer than the Whisper teacher's 1 s "
                                         r"window: re-run with --window_seconds 2 "):
        getattr(cache, command)(str(tmp_path / "audio"), tiny, [1], str(out_dir),
                                window_seconds=1.0, codec="pq", num_codebooks=4,
                                progress=False)
    assert not out_dir.exists() or not any(out_dir.iterdir())  # nothing written


@pytest.mark.parametrize("window", [0.0, 0.03, 30.02, 60.0])
def test_bad_window_is_refused(tiny, window):
    with pytest.raises(ValueError, match=r"teacher\.window_seconds.*multiple of 0\.02 s.*30 s"):
        load_teacher(tiny, [1], window_seconds=window)


def test_window_is_for_whisper_only(tmp_path):
    path = make_tiny_teacher("wav2vec2", str(tmp_path / "w2v"))
    with pytest.raises(ValueError, match=r"window_seconds.*Whisper teachers only"):
        load_teacher(path, [1], window_seconds=4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_student_inherits_the_window(tiny, dtype):
    teacher = load_teacher(tiny, [1, 3], window_seconds=2.0, dtype=dtype)
    student = build_student(teacher, 2, init_from_teacher_layers=[1, 3]).eval()
    assert student.model.config.max_source_positions == 100
    assert student.front_end.max_seconds == 2.0
    fp32 = load_teacher(tiny, [1]).model.embed_positions.weight[:100]
    assert torch.equal(student.model.embed_positions.weight, fp32)  # copied in fp32, trimmed
    wave, lengths = _batch()
    mask = torch.zeros(3, 50, dtype=torch.bool)
    with torch.no_grad():
        hidden = student(wave, lengths, mask).hidden
    if dtype == torch.float32:  # student layer 1 is teacher layer 1 on the same 2 s window
        torch.testing.assert_close(hidden[0], teacher(wave, lengths).features[0], atol=1e-4,
                                   rtol=1e-4)


def test_config_window_must_hold_the_training_crops():
    config = load_config(None, {"teacher.window_seconds": 8, "data.max_seconds": 8.0})
    assert config.teacher.window_seconds == 8.0
    with pytest.raises(ConfigError, match=r"data\.max_seconds 9\.0 is longer than "
                                          r"teacher\.window_seconds 8\.0"):
        load_config(None, {"teacher.window_seconds": 8.0, "data.max_seconds": 9.0})
    with pytest.raises(ConfigError, match=r"teacher\.window_seconds: must be > 0"):
        load_config(None, {"teacher.window_seconds": 0.0})
