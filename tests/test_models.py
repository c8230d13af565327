"""Teachers and students on tiny real-config models saved with save_pretrained (no hub)."""

import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    SeamlessM4TFeatureExtractor,
    Wav2Vec2FeatureExtractor,
)

from colld_ds.formats import SAMPLE_RATE
from colld_ds.models import build_student, family_of, load_teacher, read_num_layers
from colld_ds.models.families import record_outputs
from colld_ds.data_prep.tiny_teacher import TINY_FAMILIES, make_tiny_teacher

# Padding-invariant: an attention mask, and nothing else mixing frames across the padding edge
# (data2vec's stacked positional convs turn zeroed padded frames non-zero between layers).
PADDING_INVARIANT = ("xlsr", "w2v-bert")
S = SAMPLE_RATE


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny_teacher(family, str(root / family)) for family in TINY_FAMILIES}


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    wave = torch.randn(3, S, generator=generator) * 0.1
    lengths = torch.tensor([S, 12345, 8000])
    return wave.masked_fill(
        torch.arange(S) >= lengths[:, None], 7.0
    ), lengths  # junk in the padding


def _hf_inputs(family, path, wave):
    """One unpadded utterance through the real HF feature extractor."""
    audio = wave.numpy()
    if family == "w2v-bert":
        out = SeamlessM4TFeatureExtractor.from_pretrained(path)(
            audio, sampling_rate=S, return_tensors="pt"
        )
    else:
        out = Wav2Vec2FeatureExtractor.from_pretrained(path)(
            audio, sampling_rate=S, return_tensors="pt"
        )
    return dict(out)


def _ffn_by_hand(family, layer, h):
    """Layer (B=1, unpadded) recomputed from HF's own submodules: (ffn output, layer output)."""
    if family == "w2v-bert":
        h = h + 0.5 * layer.ffn1(layer.ffn1_layer_norm(h))
        h = h + layer.self_attn(layer.self_attn_layer_norm(h))[0]
        h = h + layer.conv_module(h)
        ffn = layer.ffn2(layer.ffn2_layer_norm(h))
        return ffn, layer.final_layer_norm(h + 0.5 * ffn)
    if family == "xlsr":  # stable layer norm: pre-LN
        h = h + layer.attention(layer.layer_norm(h))[0]
        ffn = layer.feed_forward(layer.final_layer_norm(h))
        return ffn, h + ffn
    h = layer.layer_norm(h + layer.attention(h)[0])  # post-LN
    ffn = layer.feed_forward(h)
    return ffn, layer.final_layer_norm(h + ffn)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_layer_outputs_match_hf_hidden_states(tiny, family):
    layers = [4, 1, 3]
    teacher = load_teacher(tiny[family], layers)
    wave, lengths = _batch()
    out = teacher(wave[:1], lengths[:1])
    with torch.no_grad():
        ref = teacher.model(
            **_hf_inputs(family, tiny[family], wave[0]), output_hidden_states=True
        ).hidden_states
    for layer, feature in zip(layers, out.features, strict=True):
        assert feature.shape == ref[layer].shape == (1, 49, 32)
        torch.testing.assert_close(feature, ref[layer], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_ffn_targets_match_recomputation(tiny, family):
    teacher = load_teacher(tiny[family], [2, 4], target_kind="ffn")
    wave, lengths = _batch()
    out = teacher(wave[:1], lengths[:1])
    with torch.no_grad():
        hidden = teacher.model(
            **_hf_inputs(family, tiny[family], wave[0]), output_hidden_states=True
        ).hidden_states
        for layer, feature in zip([2, 4], out.features, strict=True):
            ffn, layer_out = _ffn_by_hand(
                family, teacher.model.encoder.layers[layer - 1], hidden[layer - 1]
            )
            torch.testing.assert_close(
                layer_out, hidden[layer], atol=1e-5, rtol=1e-5
            )  # recomputation is right
            torch.testing.assert_close(feature, ffn, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(feature, hidden[layer], atol=1e-3)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_batch_shapes_frames_and_padding(tiny, family):
    teacher = load_teacher(tiny[family], [1, 4])
    student = build_student(teacher, 2, init_from_teacher_layers=[1, 4]).eval()
    wave, lengths = _batch()
    out = teacher(wave, lengths)
    with torch.no_grad():
        hidden = student(wave, lengths, None).hidden
    expected = teacher.num_frames(lengths)
    assert torch.equal(out.frame_lengths, expected) and torch.equal(
        student.num_frames(lengths), expected
    )
    num_frames = int(out.frame_lengths.max())
    assert num_frames == int(teacher.num_frames(torch.tensor(S)))
    for tensor in out.features + hidden:
        assert tensor.shape == (3, num_frames, 32)
    for b, n in enumerate(out.frame_lengths.tolist()):
        assert not out.features[0][b, n:].any() and not hidden[0][b, n:].any()
        assert out.features[0][b, :n].abs().sum(-1).min() > 0
        if family in PADDING_INVARIANT:
            alone = teacher(wave[b : b + 1, : lengths[b]], lengths[b : b + 1]).features[1]
            torch.testing.assert_close(out.features[1][b : b + 1, :n], alone, atol=1e-4, rtol=1e-4)


def test_waveform_front_end_matches_hf_extractor(tiny):
    teacher = load_teacher(tiny["xlsr"], [1])
    wave, lengths = _batch()
    inputs, _ = teacher.front_end(wave, lengths)
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(tiny["xlsr"])
    for b, n in enumerate(lengths.tolist()):
        ref = extractor(wave[b, :n].numpy(), sampling_rate=S, return_tensors="pt")["input_values"][
            0
        ]
        torch.testing.assert_close(inputs["input_values"][b, :n], ref, atol=1e-5, rtol=1e-4)
        assert not inputs["input_values"][b, n:].any()
    assert torch.equal(inputs["attention_mask"].sum(1), lengths)
    assert load_teacher(tiny["wav2vec2"], [1]).front_end(wave, lengths)[0]["attention_mask"] is None


def test_fbank_front_end_matches_hf_extractor(tiny):
    teacher = load_teacher(tiny["w2v-bert"], [1])
    wave, lengths = _batch()
    inputs, frame_lengths = teacher.front_end(wave, lengths)
    extractor = SeamlessM4TFeatureExtractor.from_pretrained(tiny["w2v-bert"])
    for b, n in enumerate(frame_lengths.tolist()):
        ref = extractor(wave[b, : lengths[b]].numpy(), sampling_rate=S, return_tensors="pt")[
            "input_features"
        ][0]
        torch.testing.assert_close(inputs["input_features"][b, :n], ref[:n])
    assert inputs["input_features"].shape[-1] == 160


def test_teacher_is_frozen_identity_and_dtype(tiny):
    teacher = load_teacher(tiny["hubert"], [2, 3], target_kind="ffn")
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert (teacher.hidden_size, teacher.num_layers, read_num_layers(tiny["hubert"])) == (32, 4, 4)
    identity = teacher.identity
    assert identity["name"] == "hubert" and identity["model_type"] == "hubert"
    assert (
        identity["layers"] == [2, 3]
        and identity["target_kind"] == "ffn"
        and identity["frame_rate"] == 50.0
    )
    assert identity["config_hash"] == load_teacher(tiny["hubert"], [1]).identity["config_hash"]
    assert identity["config_hash"] != load_teacher(tiny["wav2vec2"], [1]).identity["config_hash"]
    bf16 = load_teacher(tiny["hubert"], [2], dtype=torch.bfloat16)
    assert bf16(*_batch()).features[0].dtype == torch.bfloat16


def test_teacher_targets_usable_in_a_loss_with_backward(tiny):
    teacher = load_teacher(tiny["wav2vec2"], [2])
    student = build_student(teacher, 1, init_from_teacher_layers=[1])
    wave, lengths = _batch()
    target = teacher(wave, lengths).features[0].float()  # .float() is a no-op for an fp32 teacher
    # A product saves `target` for backward, which an inference-mode tensor would refuse.
    loss = -nn.functional.cosine_similarity(
        student(wave, lengths, None).hidden[0], target, dim=-1
    ).mean()
    loss.backward()
    assert student.model.encoder.layers[0].feed_forward.output_dense.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_student_init_copies_exact_teacher_weights(tiny, family):
    teacher = load_teacher(tiny[family], [1])
    student = build_student(teacher, 2, init_from_teacher_layers=[3, 1])
    config = student.model.config
    assert (config.num_hidden_layers, config.layerdrop, config.mask_feature_prob) == (2, 0.0, 0.0)
    assert (
        config.apply_spec_augment
        and config.mask_time_prob > 0
        and student.model.masked_spec_embed.requires_grad
    )
    t_state, s_state = teacher.model.state_dict(), student.model.state_dict()
    for key, value in s_state.items():
        if key.startswith("encoder.layers."):
            index, rest = key[len("encoder.layers.") :].split(".", 1)
            source = f"encoder.layers.{[2, 0][int(index)]}.{rest}"
            assert torch.equal(value, t_state[source]), key
            if value.dim() == 2:  # not copied from the other layer
                other = f"encoder.layers.{[0, 2][int(index)]}.{rest}"
                assert not torch.equal(value, t_state[other]), key
        else:  # front end, encoder norm, positional embedding, mask embedding
            assert torch.equal(value, t_state[key]), key


def test_narrow_student_copies_matching_front_end_only(tiny):
    teacher = load_teacher(tiny["wav2vec2"], [1])
    student = build_student(teacher, 3, hidden_size=16)
    config = student.model.config
    assert (student.hidden_size, config.num_attention_heads, config.intermediate_size) == (
        16,
        2,
        32,
    )
    t_state, s_state = teacher.model.state_dict(), student.model.state_dict()
    conv = [k for k in s_state if k.startswith("feature_extractor.")]
    assert conv and all(torch.equal(s_state[k], t_state[k]) for k in conv)
    assert s_state["feature_projection.projection.weight"].shape == (16, 16)
    wave, lengths = _batch()
    assert [h.shape for h in student(wave, lengths).hidden] == [(3, 49, 16)] * 3


def test_exported_student_loads_as_a_teacher(tiny, tmp_path):
    teacher = load_teacher(tiny["xlsr"], [1])
    student = build_student(teacher, 2, init_from_teacher_layers=[2, 4]).eval()
    student.model.save_pretrained(tmp_path)
    reloaded = load_teacher(str(tmp_path), [1, 2])
    wave, lengths = _batch()
    with torch.no_grad():
        hidden = student(wave, lengths).hidden
    for ours, theirs in zip(hidden, reloaded(wave, lengths).features, strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("family", ["wav2vec2", "w2v-bert"])
def test_student_mask_replaces_only_masked_frames(tiny, family):
    teacher = load_teacher(tiny[family], [1])
    student = build_student(teacher, 2, init_from_teacher_layers=[1, 2])
    seen = []
    student.model.encoder.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone())
    )
    wave, lengths = _batch()
    mask = torch.zeros(3, 49, dtype=torch.bool)
    mask[0, 5:15] = mask[1, 20:23] = True
    student.train()
    torch.manual_seed(0)
    masked = student(wave, lengths, mask).hidden[-1]
    torch.manual_seed(0)
    student(wave, lengths, None)
    with_mask, without = seen
    assert torch.equal(with_mask[~mask], without[~mask])  # train mode, yet no HF masking of its own
    assert torch.equal(
        with_mask[mask], student.model.masked_spec_embed.detach().expand(int(mask.sum()), -1)
    )
    masked.sum().backward()
    assert student.model.masked_spec_embed.grad.abs().sum() > 0


def test_student_rejects_wrong_mask_shape(tiny):
    student = build_student(load_teacher(tiny["hubert"], [1]), 1)
    wave, lengths = _batch()
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        student(wave, lengths, torch.zeros(3, 48, dtype=torch.bool))


def test_teacher_errors(tiny, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json") as err:
        load_teacher(missing, [1])
    assert missing in str(err.value)
    BertModel(
        BertConfig(
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
            vocab_size=10,
        )
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="'bert'.*hubert.*wav2vec2"):
        load_teacher(str(tmp_path / "bert"), [1])
    (tmp_path / "whisper").mkdir()
    (tmp_path / "whisper" / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(ValueError, match="whisper"):
        read_num_layers(str(tmp_path / "whisper"))
    for layer in (0, 5):
        with pytest.raises(
            ValueError, match=rf"layer_map.*layer {layer}.*4 layers \(num_hidden_layers\)"
        ):
            load_teacher(tiny["wav2vec2"], [1, layer])
    with pytest.raises(ValueError, match="target_kind"):
        load_teacher(tiny["wav2vec2"], [1], target_kind="attention")
    assert os.path.isdir(tiny["wav2vec2"])


def test_student_errors(tiny):
    teacher = load_teacher(tiny["wav2vec2"], [1])
    with pytest.raises(ValueError, match="wider than its teacher"):
        build_student(teacher, 2, hidden_size=64)
    with pytest.raises(
        ValueError,
        match=r"student\.hidden_size.*student\.init_from_teacher_layers|"
        r"student\.init_from_teacher_layers.*student\.hidden_size",
    ):
        build_student(teacher, 2, hidden_size=16, init_from_teacher_layers=[1, 2])
    with pytest.raises(ValueError, match="one teacher layer per student layer"):
        build_student(teacher, 2, init_from_teacher_layers=[1])
    with pytest.raises(ValueError, match="teacher layer 5 is out of range"):
        build_student(teacher, 2, init_from_teacher_layers=[1, 5])
    with pytest.raises(ValueError, match="num_attention_heads"):
        build_student(teacher, 2, num_attention_heads=5)


def test_tiny_teacher_is_deterministic(tmp_path):
    first = make_tiny_teacher("hubert", str(tmp_path / "a"), seed=1)
    second = make_tiny_teacher("hubert", str(tmp_path / "b"), seed=1)
    a, b = load_teacher(first, [1]).model.state_dict(), load_teacher(second, [1]).model.state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    with pytest.raises(ValueError, match="choose one of"):
        make_tiny_teacher("bert", str(tmp_path / "c"))


def test_student_of_half_precision_teacher_gets_exact_fp32_weights(tiny):
    fp16_teacher = load_teacher(tiny["xlsr"], [1], dtype=torch.float16)
    student = build_student(fp16_teacher, 1, init_from_teacher_layers=[2])
    fp32_state = load_teacher(tiny["xlsr"], [1]).model.state_dict()
    s_state = student.model.state_dict()
    assert s_state["encoder.layers.0.attention.q_proj.weight"].dtype == torch.float32
    assert torch.equal(
        s_state["encoder.layers.0.attention.q_proj.weight"],
        fp32_state["encoder.layers.1.attention.q_proj.weight"],
    )
    assert torch.equal(s_state["encoder.layer_norm.weight"],
                       fp32_state["encoder.layer_norm.weight"])


def test_whisper_is_a_registered_family(tmp_path):
    family = family_of("whisper")
    assert (family.layers_field, family.width_field, family.ffn_attr) == (
        "encoder_layers",
        "d_model",
        "fc2",
    )
    assert not family.hf_time_masking and family.input_kind == "logmel"
    path = make_tiny_teacher("whisper", str(tmp_path / "whisper"))
    teacher = load_teacher(path, [2], target_kind="ffn")
    assert teacher.family is family and read_num_layers(path) == 4
    wave, lengths = _batch()
    assert teacher(wave, lengths).features[0].shape == (3, 50, 32)


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "whisper"])
def test_student_forward_equals_hf_forward_with_its_mask(tiny, family):
    """The student runs HF's forward piece by piece (mask embedding by torch.where): its layer
    outputs equal those of HF's own ``model(**inputs, mask_time_indices=...)`` on a padded,
    masked batch, at every valid frame (HF leaves padded frames as they are; we zero them)."""

    student = build_student(load_teacher(tiny[family], [1]), 2, init_from_teacher_layers=[1, 2])
    student.eval()
    wave, lengths = _batch()
    num_frames = int(student.num_frames(torch.tensor(S)))
    mask = torch.rand(3, num_frames, generator=torch.Generator().manual_seed(1)) < 0.4
    ours = student(wave, lengths, mask).hidden
    inputs, frame_lengths = student.front_end(wave, lengths)
    with torch.no_grad(), record_outputs(list(student.family.layers(student.model))) as theirs:
        student.model(**inputs, mask_time_indices=mask)
    valid = torch.arange(num_frames) < frame_lengths[:, None]
    assert mask[valid].any()
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine[valid], reference[:, :num_frames][valid],
                                   atol=1e-5, rtol=1e-5)
