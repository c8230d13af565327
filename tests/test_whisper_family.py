"""Whisper's encoder as a teacher family and its student (tiny real-config Whisper, no hub)."""

import math
import os

import numpy as np
import pytest
import torch
from torch import nn
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from colld_ds.models import build_student, load_teacher, read_num_layers
from data_prep.tiny_teacher import make_tiny_teacher

S = 16000
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
    reason=f"no converted Whisper tiny.en at {REAL_TINY_EN} (data_prep convert-whisper makes it)",
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
