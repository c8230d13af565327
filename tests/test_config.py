"""Config loading, overrides, validation messages and the DeepSpeed config filling."""

import json
from pathlib import Path

import pytest
import yaml

from colld_ds.config import ConfigError, load_config
from colld_ds.ds_config import build_ds_config
from colld_ds.layer_map import resolve_layer_map, uniform_teacher_layers

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "configs" / "tiny-wav2vec2_to_2l_colld.yaml"


def test_yaml_then_overrides():
    config = load_config(EXAMPLE, {"objective.temperature": 0.05, "run.zero-stage": 3,
                                   "layer_map.teacher_layers": [[1], [3]]})
    assert config.objective.temperature == 0.05
    assert config.run.zero_stage == 3
    assert config.layer_map.teacher_layers == [[1], [3]]
    assert config.data.batch_size == 4                       # from the YAML
    assert config.optim.decay == "linear"                    # default


def test_command_line_booleans():
    """fire hands `--student.freeze_front_end true` over as the string 'true'."""
    for text, want in [("true", True), ("False", False), (True, True)]:
        assert load_config(EXAMPLE, {"student.freeze_front_end": text}).student.freeze_front_end \
            is want
    with pytest.raises(ConfigError, match="student.freeze_front_end: expected true/false"):
        load_config(EXAMPLE, {"student.freeze_front_end": "yes please"})


@pytest.mark.parametrize("overrides,message", [
    ({"objective.name": "mse"}, "objective.name: 'mse' is not allowed; choose one of"),
    ({"objective.temprature": 0.1}, "objective.temprature: unknown field"),
    ({"data.batch_size": "eight"}, "data.batch_size: expected an integer"),
    ({"run.zero_stage": 4}, "run.zero_stage: 4 is not allowed"),
    ({"objective.temperature": 0}, "objective.temperature: must be > 0"),
    ({"student.init_from_teacher_layers": [1]}, "student.init_from_teacher_layers"),
    ({"layer_map.teacher_layers": [[1]]}, "layer_map.teacher_layers: needs one list per"),
    ({"masking.mask_prob": 0.0, "objective.anchor_frames": "masked"},
     "scores masked frames only; it needs > 0 (or objective.anchor_frames all"),
    ({"objective.anchor_frames": "some"}, "objective.anchor_frames: .some. is not allowed"),
    ({"run.offload_optimizer": True, "run.zero_stage": 1}, "run.offload_optimizer"),
    ({"data.codebook_file": "codebook.npy"}, "data.codebook_file: the codebook of a pq or rq "
     "teacher cache; set data.teacher_cache"),
])
def test_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(EXAMPLE, overrides)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_a_saved_config_with_a_removed_field_loads_only_at_its_current_value(tmp_path):
    """Runs saved by an earlier colld hold objective.negative_min_distance (removed): 1, what
    colld does now, loads as if absent; another value names the field and the file."""
    saved = load_config(EXAMPLE).to_dict()
    saved["objective"]["negative_min_distance"] = 1
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    assert load_config(path).to_dict() == load_config(EXAMPLE).to_dict()
    saved["objective"]["negative_min_distance"] = 5
    path.write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=f"objective.negative_min_distance: 5 in {path}; the "
                                          "field was removed"):
        load_config(path)


def test_uniform_layer_map_and_out_of_range_layer():
    assert uniform_teacher_layers(2, 12) == [6, 12]
    assert uniform_teacher_layers(3, 24) == [8, 16, 24]
    assert uniform_teacher_layers(4, 6) == [2, 3, 5, 6]      # 1.5 -> 2, 4.5 -> 5: halves go up
    config = load_config(EXAMPLE, {"layer_map.teacher_layers": [[2], [5]]})
    with pytest.raises(ConfigError, match="teacher layer 5 does not exist; the teacher has "
                                          r"layers 1\.\.4"):
        resolve_layer_map(config, num_teacher_layers=4)
    distil = load_config(EXAMPLE, {"objective.name": "distilhubert",
                                   "layer_map.teacher_layers": None, "masking.mask_prob": 0.0})
    assert [(p.student_layer, p.teacher_layer) for p in resolve_layer_map(distil, 12)] == [
        (2, 4), (2, 8), (2, 12)]


@pytest.mark.parametrize("stage,offload", [(1, False), (2, False), (2, True), (3, False)])
def test_ds_config_takes_owned_values_from_the_training_config(stage, offload):
    config = load_config(EXAMPLE, {"run.zero_stage": stage, "run.offload_optimizer": offload,
                                   "run.precision": "bf16", "optim.lr": 3e-4,
                                   "optim.gradient_accumulation_steps": 4})
    ds = build_ds_config(config)
    assert ds["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in ds["zero_optimization"]) == offload
    assert ds["train_micro_batch_size_per_gpu"] == config.data.batch_size
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["optimizer"]["params"]["lr"] == 3e-4
    assert ds["scheduler"]["params"]["total_num_steps"] == config.optim.max_steps
    assert ds["gradient_clipping"] == config.optim.grad_clip
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "auto" not in json.dumps(ds)


def test_ds_template_with_a_concrete_owned_value_is_refused(tmp_path):
    template = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    template["train_micro_batch_size_per_gpu"] = 16
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(template))
    config = load_config(EXAMPLE, {"run.ds_config": str(path)})
    with pytest.raises(ConfigError, match="'train_micro_batch_size_per_gpu' is 16; the training "
                                          "config owns it"):
        build_ds_config(config)
