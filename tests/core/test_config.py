import pytest

from dermt2im.core.config import FactoryConfig, load_config
from dermt2im.core.errors import ConfigError
from dermt2im.core.identity import spec_digest
from dermt2im.ingest.labels import label_map


def test_presets_load_and_differ():
    smoke = load_config("smoke")
    paper = load_config("paper")
    tiny = load_config("tiny")
    assert smoke.train.base_model == "mini" and tiny.train.base_model == "tiny"
    # the demo keeps every quality check, calibrated on the seeds as the paper preset's are
    calibrated = ("min_std", "max_high_frequency_ratio", "min_sharpness", "min_lesion_contrast")
    assert smoke.quality == paper.quality and all(getattr(smoke.quality, c) is None for c in calibrated)
    # the LoRA reaches beyond attention on the miniature model only: the paper keeps Table II's
    assert paper.train.target_modules == ("to_k", "to_q", "to_v", "to_out.0") and paper.train.rank == 4
    assert "ff.net.2" in smoke.train.target_modules and not paper.train.train_text_encoder
    assert paper.train.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # Table II
    assert (paper.train.train_batch_size, paper.train.epochs, paper.train.optimizer) == (2, 120, "adamw8bit")
    assert paper.train.mixed_precision == "fp16" and not paper.train.train_text_encoder
    assert paper.generate.guidance_scale == 7.0 and set(paper.generate.samplers) == {"euler", "euler_a", "plms"}


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  rnak: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "train.rnak" in str(err.value) and str(bad) in str(err.value) and "unknown key" in str(err.value)


def test_wrong_type_names_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate:\n  per_class: many\n")
    with pytest.raises(ConfigError, match=r"generate\.per_class"):
        load_config(bad)


def test_overrides_apply_and_are_validated():
    cfg = load_config("smoke", ["train.rank=8", "validate.epochs=5"])
    assert cfg.train.rank == 8 and cfg.validation.epochs == 5
    with pytest.raises(ConfigError, match=r"train\.rank"):
        load_config("smoke", ["train.rank=-1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("smoke", ["train.rank"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="must be 1.0"):
        load_config("smoke", ["ingest.splits.train=0.9"])
    with pytest.raises(ConfigError, match="steps_max"):
        load_config("smoke", ["generate.steps_min=30"])


def test_missing_preset_lists_presets():
    with pytest.raises(ConfigError, match="smoke"):
        load_config("nope")


def test_digest_tracks_section_changes():
    a, b = load_config("smoke"), load_config("smoke", ["train.rank=8"])
    assert spec_digest(a.train) != spec_digest(b.train)
    assert spec_digest(a.generate) == spec_digest(b.generate)
    assert isinstance(spec_digest(FactoryConfig().train), str)


def test_runtime_settings_are_apart_from_specs_and_never_change_a_digest():
    a = load_config("smoke")
    b = load_config("smoke", ["runtime.generate.batch_size=16", "runtime.train.device=auto",
                              "runtime.preprocess.workers=3", "storage.images=s3://b/p"])
    for section in ("preprocess", "train", "generate", "validation"):
        assert spec_digest(getattr(a, section)) == spec_digest(getattr(b, section))
    assert b.runtime.generate.batch_size == 16 and b.storage.images == "s3://b/p"
    assert "batch_size" not in a.generate.model_dump() and "device" not in a.train.model_dump()


def test_keys_that_moved_are_read_with_a_warning(caplog):
    cfg = load_config("smoke", ["generate.batch_size=7", "generate.image_store=s3://b/i", "train.device=cpu"])
    assert cfg.runtime.generate.batch_size == 7 and cfg.storage.images == "s3://b/i"
    assert cfg.runtime.train.device == "cpu"
    assert "generate.batch_size is now runtime.generate.batch_size" in caplog.text


def test_label_map_override():
    cfg = load_config("smoke", ["ingest.diagnosis_labels={Atypical_Nevus: benign}"])
    m = label_map(cfg.ingest)
    assert m["atypical nevus"] == "benign" and m["melanoma"] == "malignant"


@pytest.mark.parametrize("typed,switch", [("on", "on"), ("off", "off"), ("true", "on"), ("false", "off"),
                                          ("yes", "on"), ("no", "off"), ("ON", "on"), ("auto", "auto")])
def test_switches_accept_what_a_person_types_on_the_command_line(typed, switch):
    """YAML 1.1 reads on / off / yes / no as booleans: ``--set runtime.train.compile=on`` was refused
    with "Input should be 'auto', 'on' or 'off' (got True)"."""
    cfg = load_config("paper", [f"runtime.train.compile={typed}", f"runtime.generate.channels_last={typed}"])
    assert cfg.runtime.train.compile == switch and cfg.runtime.generate.channels_last == switch


def test_switches_and_precision_words_in_a_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  mixed_precision: no\nvalidate:\n  mixed_precision: off\nruntime:\n  train:\n"
                 "    compile: on\n    channels_last: yes\n    gradient_checkpointing: off\n  generate:\n"
                 "    compile: true\n")
    cfg = load_config(f)
    assert cfg.train.mixed_precision == "no" and cfg.validation.mixed_precision == "no"
    assert (cfg.runtime.train.compile, cfg.runtime.train.channels_last) == ("on", "on")
    assert cfg.runtime.train.gradient_checkpointing is False and cfg.runtime.generate.compile == "on"
    # a word that is no switch is still refused, naming the key
    with pytest.raises(ConfigError, match=r"runtime\.train\.compile"):
        load_config("paper", ["runtime.train.compile=sometimes"])


def test_precision_no_unquoted_in_overrides_keeps_the_key():
    """``mixed_precision=no`` (unquoted, as a deployment override or on the CLI) is the same spec as "no"."""
    typed = load_config("smoke", ["train.mixed_precision=no"])
    assert typed.train.mixed_precision == "no"
    assert spec_digest(typed.train) == spec_digest(load_config("smoke").train)


def test_a_saved_workdir_config_keeps_words(tmp_path):
    from dermt2im.core.workdir import open_workdir

    w, cfg = open_workdir(tmp_path / "w", "smoke", ["runtime.train.compile=on", "train.mixed_precision=off"])
    again = load_config(w.root / "config.yaml")
    assert again.runtime.train.compile == "on" and again.train.mixed_precision == "no"
