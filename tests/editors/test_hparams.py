"""Hyper-parameters: JSON/YAML overrides, dotted keys, string coercion, unknown fields,
per-family overrides and layer defaults by depth fraction."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from repedit.editors import (
    AlphaEditHparams,
    CoreHparams,
    EmmetHparams,
    LocateEditHparams,
    MemitHparams,
    RomeHparams,
    RRomeHparams,
    ValueHparams,
    make_editor,
)
from repedit.editors.hparams import FAMILY_OVERRIDES, Hparams, layer_at
from repedit.errors import InvalidRequestError
from repedit.models import LoadedModel
from repedit.models.tiny import tiny_tokenizer

ALL = (RomeHparams, RRomeHparams, MemitHparams, EmmetHparams, AlphaEditHparams, CoreHparams)


@dataclasses.dataclass
class _Flags(Hparams):
    """A test-only dataclass with the field types the coercion must handle."""

    enabled: bool = True
    ratio: float = 1.0
    count: int = 3
    name: str = "x"
    pairs: tuple[tuple[int, int], ...] = ((1, 2),)


def _deep(family: str, n_layers: int) -> LoadedModel:
    """A minimal random model of ``family`` with ``n_layers`` layers (for layer defaults)."""
    if family == "gpt2":
        kw = {"n_embd": 16, "n_inner": 32, "n_layer": n_layers, "n_head": 2, "n_positions": 64}
    else:
        kw = {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": n_layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
        }
    config = AutoConfig.for_model(family, vocab_size=384, **kw)
    return LoadedModel(AutoModelForCausalLM.from_config(config), tiny_tokenizer(), name=family)


@pytest.fixture(scope="module")
def llama32() -> LoadedModel:
    return _deep("llama", 32)


@pytest.fixture(scope="module")
def gpt2_32() -> LoadedModel:
    return _deep("gpt2", 32)


def _layers(method: str, lm: LoadedModel, overrides: dict | None = None) -> list[int]:
    editor = make_editor(method, overrides)
    return editor.layers(lm, editor.resolved(lm))


# --------------------------------------------------------------------------- files


def test_json_override_file(tmp_path: Path) -> None:
    path = tmp_path / "rome.json"
    path.write_text(json.dumps({"layer": 3, "contexts": [[4, 2]], "value": {"lr": 0.1}}))
    hp = RomeHparams().update_from_file(path)
    assert hp.layer == 3
    assert hp.contexts == ((4, 2),)  # JSON lists become the field's tuples
    assert hp.value.lr == 0.1
    assert hp.value.steps == ValueHparams().steps  # untouched nested fields keep defaults


def test_yaml_override_file_with_dotted_keys(tmp_path: Path) -> None:
    path = tmp_path / "memit.yaml"
    path.write_text(
        yaml.safe_dump(
            {"layers": [2, 3, 4], "mom2_update_weight": 1500.0, "value.steps": 7, "value.lr": "0.3"}
        )
    )
    hp = MemitHparams().update_from_file(path)
    assert hp.layers == (2, 3, 4)
    assert hp.mom2_update_weight == 1500.0
    assert hp.value.steps == 7 and isinstance(hp.value.steps, int)
    assert hp.value.lr == 0.3
    assert MemitHparams().update_from_file(path.with_suffix(".yaml")) == hp
    yml = tmp_path / "memit.yml"
    yml.write_text(path.read_text())
    assert MemitHparams().update_from_file(yml) == hp


def test_empty_yaml_file_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert RomeHparams().update_from_file(path) == RomeHparams()


def test_override_file_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(InvalidRequestError, match="mapping"):
        RomeHparams().update_from_file(path)


def test_unknown_field_in_a_file_names_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"layr": 3}))
    with pytest.raises(InvalidRequestError) as err:
        RomeHparams().update_from_file(path)
    msg = str(err.value)
    assert "layr" in msg
    for known in ("layer", "layer_fraction", "contexts", "value"):
        assert known in msg


# --------------------------------------------------------------------------- replace


def test_dotted_and_nested_dict_overrides_agree() -> None:
    a = RomeHparams().replace(**{"value.lr": 0.2, "value.steps": 5})
    b = RomeHparams().replace(value={"lr": 0.2, "steps": 5})
    assert a == b
    assert a.value.lr == 0.2 and a.value.steps == 5
    assert a.value.kl_factor == ValueHparams().kl_factor
    assert RomeHparams().value.lr == ValueHparams().lr  # replace copies, never mutates


def test_replace_returns_a_copy() -> None:
    hp = MemitHparams()
    changed = hp.replace(layers=(1, 2))
    assert hp.layers is None and changed.layers == (1, 2)
    assert type(changed) is MemitHparams


@pytest.mark.parametrize("text", ["false", "False", "FALSE", "0"])
def test_false_strings_are_false(text: str) -> None:
    hp = _Flags().replace(enabled=text)
    assert hp.enabled is False


@pytest.mark.parametrize("text", ["true", "True", "1"])
def test_true_strings_are_true(text: str) -> None:
    assert _Flags(enabled=False).replace(enabled=text).enabled is True


@pytest.mark.parametrize("text", ["yes please", "", "2"])
def test_other_strings_for_a_bool_are_rejected(text: str) -> None:
    with pytest.raises(InvalidRequestError, match="true/false"):
        _Flags().replace(enabled=text)


def test_numeric_strings_are_coerced() -> None:
    hp = _Flags().replace(ratio="0.5", count="7")
    assert hp.ratio == 0.5 and isinstance(hp.ratio, float)
    assert hp.count == 7 and isinstance(hp.count, int)
    assert RomeHparams().replace(**{"value.lr": "0.5"}).value.lr == 0.5
    assert RomeHparams().replace(**{"value.steps": "12"}).value.steps == 12


def test_strings_for_optional_fields_are_coerced_to_the_declared_type() -> None:
    """Fields that default to None (``layer``, ``layers``, λ) come from CLIs as strings too."""
    assert RomeHparams().replace(layer="3").layer == 3
    assert MemitHparams().replace(mom2_update_weight="1500").mom2_update_weight == 1500.0
    assert MemitHparams().replace(layers=[4, 5]).layers == (4, 5)
    assert RomeHparams(layer=3).replace(layer="none").layer is None  # --set layer=none
    assert (
        MemitHparams(mom2_update_weight=1.0).replace(mom2_update_weight="null").mom2_update_weight
        is None
    )


@pytest.mark.parametrize(("field", "text"), [("ratio", "fast"), ("count", "1.5"), ("count", "")])
def test_bad_numeric_strings_are_rejected(field: str, text: str) -> None:
    with pytest.raises(InvalidRequestError, match="number"):
        _Flags().replace(**{field: text})


def test_lists_become_tuples() -> None:
    hp = _Flags().replace(pairs=[[5, 5], [10, 5]])
    assert hp.pairs == ((5, 5), (10, 5))
    assert LocateEditHparams().replace(contexts=[[3, 2]]).contexts == ((3, 2),)


@pytest.mark.parametrize("cls", ALL)
def test_unknown_fields_are_rejected_with_the_known_ones(cls: type[Hparams]) -> None:
    with pytest.raises(InvalidRequestError) as err:
        cls().replace(nonexistent=1)
    msg = str(err.value)
    assert "nonexistent" in msg
    for known in sorted(cls.field_names()):
        assert known in msg


def test_unknown_nested_field_names_the_known_value_fields() -> None:
    with pytest.raises(InvalidRequestError) as err:
        RomeHparams().replace(**{"value.learning_rate": 0.1})
    msg = str(err.value)
    assert "learning_rate" in msg
    for known in ("lr", "steps", "kl_factor", "clamp_norm_factor"):
        assert known in msg
    with pytest.raises(InvalidRequestError, match="learning_rate"):
        RomeHparams().replace(value={"learning_rate": 0.1})


def test_method_fields_do_not_leak_across_methods() -> None:
    with pytest.raises(InvalidRequestError, match="layer_fraction"):
        MemitHparams().replace(layer_fraction=0.3)
    with pytest.raises(InvalidRequestError, match="emmet_lambda"):
        MemitHparams().replace(emmet_lambda=0.1)
    assert AlphaEditHparams().replace(nullspace_threshold="0.001").nullspace_threshold == 1e-3


@pytest.mark.parametrize("cls", ALL)
def test_dict_round_trip(cls: type[Hparams]) -> None:
    hp = cls().replace(**{"value.lr": 0.25, "contexts": ((2, 1),)})
    as_dict = hp.to_dict()
    assert json.loads(json.dumps(as_dict)) is not None  # JSON-serialisable
    assert cls.from_dict(as_dict) == hp
    assert cls.from_dict(json.loads(json.dumps(as_dict))) == hp


def test_editor_accepts_a_dict_of_overrides() -> None:
    editor = make_editor("memit", {"value.lr": "0.1", "layers": [1, 2]})
    assert editor.hparams.value.lr == 0.1
    assert editor.hparams.layers == (1, 2)
    assert isinstance(editor.hparams, MemitHparams)


# --------------------------------------------------------------------------- layers


def test_layer_at_is_a_clamped_depth_fraction() -> None:
    assert layer_at(0.0, 32) == 0
    assert layer_at(0.16, 32) == 5
    assert layer_at(0.35, 48) == 17
    assert layer_at(1.0, 32) == 31
    assert layer_at(5.0, 4) == 3
    assert layer_at(-1.0, 4) == 0


def test_reference_layers_for_a_32_layer_llama(llama32: LoadedModel) -> None:
    """Defaults reproduce the REP code's LLaMA-2 7B settings (method reference §1)."""
    assert _layers("rome", llama32) == [5]
    assert _layers("r-rome", llama32) == [5]
    assert _layers("memit", llama32) == [4, 5, 6, 7, 8]
    assert _layers("emmet", llama32) == [5]
    assert _layers("alphaedit", llama32) == [4, 5, 6, 7, 8]


def test_layer_defaults_scale_with_depth() -> None:
    lm12 = _deep("llama", 12)
    assert _layers("rome", lm12) == [layer_at(RomeHparams().layer_fraction, 12)]
    lo, hi = (layer_at(f, 12) for f in MemitHparams().layer_fractions)
    assert _layers("memit", lm12) == list(range(lo, hi + 1))
    assert _layers("rome", lm12) != [5]  # not a hard-coded layer number


def test_gpt2_rome_layer_differs_from_llama_at_the_same_depth(
    llama32: LoadedModel, gpt2_32: LoadedModel
) -> None:
    gpt2_fraction = FAMILY_OVERRIDES["gpt2"]["rome"]["layer_fraction"]
    assert _layers("rome", gpt2_32) == [layer_at(gpt2_fraction, 32)]
    assert _layers("rome", gpt2_32) != _layers("rome", llama32)
    assert _layers("r-rome", gpt2_32) == _layers("rome", gpt2_32)
    # ROME's own GPT-2 XL setting: layer 17 of 48
    assert _layers("rome", _deep("gpt2", 48)) == [17]
    # families without an override use the generic default
    assert _layers("memit", gpt2_32) == _layers("memit", llama32)
    resolved = make_editor("rome").resolved(gpt2_32)
    assert resolved.layer_fraction == gpt2_fraction


def test_explicit_settings_win_over_family_overrides(gpt2_32: LoadedModel) -> None:
    assert _layers("rome", gpt2_32, {"layer": 3}) == [3]
    assert _layers("rome", gpt2_32, {"layer_fraction": 0.5}) == [16]
    assert _layers("memit", gpt2_32, {"layers": [9, 7]}) == [7, 9]
    assert _layers("emmet", gpt2_32, {"layer_fractions": [0.5, 0.5]}) == [16]


def test_memit_fits_its_value_on_the_value_side_forms_by_default() -> None:
    from repedit.editors import AlphaEditHparams, CoreHparams, MemitHparams, ValueHparams
    from repedit.editors.values import ROBUST_VALUE

    assert MemitHparams().value == ValueHparams(**ROBUST_VALUE)
    assert ROBUST_VALUE == {"robust_forms": 3, "robust_prefix_lengths": (50, 300)}
    # the other editors keep their own value step; the value side turns off from the CLI's text
    assert AlphaEditHparams().value == ValueHparams()
    assert CoreHparams().value == ValueHparams(stop_prob=1.0)
    off = MemitHparams().replace(**{"value.robust_forms": "0", "value.robust_prefix_lengths": ""})
    assert off.value == ValueHparams()
