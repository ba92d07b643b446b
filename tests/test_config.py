"""ADQConfig: every field is validated with an error naming the field and its allowed values, and
the config survives JSON exactly (it is written to config.json as ``quantization_config``)."""

import json

import pytest

from adq_hf import ADQConfig

BITS = ("2 to 8",)
BITS_OR_NONE = ("2 to 8", "or None")


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        ({"weight_bits": 1}, "weight_bits", BITS),
        ({"weight_bits": 9}, "weight_bits", BITS),
        ({"weight_bits": "4"}, "weight_bits", BITS),
        ({"weight_bits": True}, "weight_bits", BITS),
        ({"weight_bits": 4.0}, "weight_bits", BITS),
        ({"weight_bits": None}, "weight_bits", BITS),
        ({"activation_bits": 0}, "activation_bits", BITS_OR_NONE),
        ({"activation_bits": 9}, "activation_bits", BITS_OR_NONE),
        ({"activation_bits": True}, "activation_bits", BITS_OR_NONE),
        ({"first_layer_bits": 16}, "first_layer_bits", BITS_OR_NONE),
        ({"first_layer_bits": "8"}, "first_layer_bits", BITS_OR_NONE),
        ({"last_layer_bits": 1}, "last_layer_bits", BITS_OR_NONE),
        ({"last_layer_bits": False}, "last_layer_bits", BITS_OR_NONE),
        ({"weight_quantizer": "kmeans"}, "weight_quantizer", ("'adq'", "'lsq'")),
        ({"weight_quantizer": "n2uq"}, "weight_quantizer", ("'adq'", "'lsq'")),
        ({"weight_quantizer": None}, "weight_quantizer", ("'adq'", "'lsq'")),
        ({"weight_quantizer": ["adq"]}, "weight_quantizer", ("'adq'", "'lsq'")),
        ({"activation_quantizer": "pact"}, "activation_quantizer", ("'lsq'", "'n2uq'")),
        ({"activation_quantizer": "adq"}, "activation_quantizer", ("'lsq'", "'n2uq'")),
        ({"granularity": "per_block"}, "granularity", ("'per_channel'", "'per_group'", "'per_tensor'")),
        ({"granularity": "channel"}, "granularity", ("'per_channel'", "'per_tensor'")),
        ({"codebook_init": "kmeans"}, "codebook_init", ("'quantile'", "'uniform'")),
        ({"codebook_update": "sgd"}, "codebook_update", ("'ema'", "'static'")),
        ({"ema_decay": 0}, "ema_decay", ("(0, 1)",)),
        ({"ema_decay": 1}, "ema_decay", ("(0, 1)",)),
        ({"ema_decay": 1.0}, "ema_decay", ("(0, 1)",)),
        ({"ema_decay": -1}, "ema_decay", ("(0, 1)",)),
        ({"ema_decay": "0.99"}, "ema_decay", ("(0, 1)",)),
        ({"ema_decay": float("nan")}, "ema_decay", ("(0, 1)",)),
        ({"codebook_init_iters": -1}, "codebook_init_iters", (">= 0",)),
        ({"codebook_init_iters": 2.5}, "codebook_init_iters", (">= 0",)),
        ({"codebook_init_iters": True}, "codebook_init_iters", (">= 0",)),
        ({"ema_update_interval": 0}, "ema_update_interval", (">= 1",)),
        ({"ema_update_interval": -3}, "ema_update_interval", (">= 1",)),
        ({"ema_update_interval": 2.0}, "ema_update_interval", (">= 1",)),
        ({"layer_bits": {r"layer1\..*": 9}}, "layer_bits", BITS),
        ({"layer_bits": {"fc": True}}, "layer_bits", BITS),
        ({"layer_bits": {"(": 4}}, "layer_bits", ("regex",)),
        ({"layer_bits": {"layer[1": 4}}, "layer_bits", ("regex",)),
        ({"layer_bits": {3: 4}}, "layer_bits", ("regex",)),
        ({"layer_bits": [4]}, "layer_bits", ("dict",)),
        ({"modules_to_not_convert": ["fc["]}, "modules_to_not_convert", ("regex",)),
        ({"modules_to_not_convert": ["*head"]}, "modules_to_not_convert", ("regex",)),
        ({"modules_to_not_convert": [None]}, "modules_to_not_convert", ("regex",)),
        # a bare string would otherwise be read as a list of one-letter patterns
        ({"modules_to_not_convert": "head"}, "modules_to_not_convert", ("list",)),
        ({"modules_to_not_convert": 5}, "modules_to_not_convert", ("list",)),
        ({"target_avg_bits": 1.5}, "target_avg_bits", ("2 to 8",)),
        ({"target_avg_bits": 8.5}, "target_avg_bits", ("2 to 8",)),
        ({"target_avg_bits": True}, "target_avg_bits", ("2 to 8",)),
        ({"quant_method": "gptq"}, "quant_method", ("'adq'",)),
    ],
)
def test_invalid_fields_name_the_field_and_the_allowed_values(kwargs, field, allowed):
    with pytest.raises(ValueError) as err:
        ADQConfig(**kwargs)
    message = str(err.value)
    assert f"ADQConfig.{field}" in message, message
    for text in allowed:
        assert text in message, message


def test_asq_and_post_are_selectable_and_listed_as_allowed():
    config = ADQConfig(weight_quantizer="post", activation_quantizer="asq", activation_bits=4)
    assert (config.weight_quantizer, config.activation_quantizer) == ("post", "asq")
    for field, allowed in (("weight_quantizer", "'post'"), ("activation_quantizer", "'asq'")):
        with pytest.raises(ValueError, match=allowed):
            ADQConfig(**{field: "nope"})


def test_unknown_field_is_rejected_with_the_known_ones():
    with pytest.raises(ValueError) as err:
        ADQConfig(wbits=2, weight_bits=3)
    message = str(err.value)
    assert "unknown field(s) ['wbits']" in message
    for known in ("weight_bits", "activation_bits", "layer_bits", "ema_decay", "granularity"):
        assert known in message
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bits'\]"):
        ADQConfig.from_dict({"quant_method": "adq", "bits": 4})


def test_from_dict_overrides_are_validated_and_unknown_ones_returned():
    base = ADQConfig(weight_bits=2).to_dict()
    config, unused = ADQConfig.from_dict(base, return_unused_kwargs=True, weight_bits=3, trust_remote_code=True)
    assert config.weight_bits == 3 and unused == {"trust_remote_code": True}
    with pytest.raises(ValueError, match="weight_bits"):  # the mixin set overrides without checking them
        ADQConfig.from_dict(base, weight_bits=17)


def test_valid_edges_are_accepted():
    for bits in (2, 8):
        config = ADQConfig(weight_bits=bits, activation_bits=bits, first_layer_bits=bits, last_layer_bits=bits,
                           layer_bits={"x": bits})
        assert config.weight_bits == bits and config.layer_bits == {"x": bits}
    config = ADQConfig(activation_bits=None, first_layer_bits=None, last_layer_bits=None, ema_decay=0.5,
                       ema_update_interval=1, target_avg_bits=2, modules_to_not_convert=("fc", "head"))
    assert config.modules_to_not_convert == ["fc", "head"]  # a tuple is stored as a list (JSON)
    assert isinstance(config.target_avg_bits, float) and isinstance(config.ema_decay, float)
    assert ADQConfig(layer_bits=None).layer_bits == {} and ADQConfig(modules_to_not_convert=None).modules_to_not_convert == []


def _rich_config():
    return ADQConfig(
        weight_bits=3, activation_bits=None, weight_quantizer="lsq", activation_quantizer="lsq",
        # overlapping patterns: "first full match wins", so their order is part of the config
        layer_bits={r"layer1\.0\..*": 2, r"layer1\..*": 4, "fc": 8},
        modules_to_not_convert=["head", r"blocks\.\d+\.attn"], first_layer_bits=None, last_layer_bits=6,
        granularity="per_channel", codebook_init="uniform", codebook_update="static",
        ema_decay=0.999, ema_update_interval=4, target_avg_bits=2.8,
    )


@pytest.mark.parametrize("make", [_rich_config, ADQConfig], ids=["rich", "default"])
def test_exact_json_round_trip(make, tmp_path):
    config = make()
    as_dict = config.to_dict()
    from adq_hf.config import RUNTIME_FIELDS  # calibration data and tokenizer: never written to config.json

    assert list(as_dict) == ["quant_method", *[k for k in ADQConfig._field_names()
                                               if k != "quant_method" and k not in RUNTIME_FIELDS]]
    assert as_dict["quant_method"] == "adq"
    for use_diff in (True, False):
        text = config.to_json_string(use_diff=use_diff)
        loaded = json.loads(text)
        assert loaded == as_dict  # every field, None fields included as null
        again = ADQConfig.from_dict(loaded)
        assert again == config and again.to_dict() == as_dict
        assert list(again.layer_bits.items()) == list(config.layer_bits.items())  # order kept
        assert json.loads(again.to_json_string()) == loaded
    path = tmp_path / "quantization_config.json"
    config.to_json_file(path)
    from_file = ADQConfig.from_dict(json.loads(path.read_text()))
    assert from_file == config and list(from_file.layer_bits) == list(config.layer_bits)
    assert ADQConfig.from_dict(as_dict) == config and ADQConfig(**as_dict) == config
    assert as_dict == make().to_dict()  # to_dict/from_dict do not mutate anything shared


def test_round_trip_keeps_which_bits_a_layer_gets():
    config = _rich_config()
    again = ADQConfig.from_dict(json.loads(config.to_json_string()))
    for name in ("layer1.0.conv1", "layer1.1.conv2", "fc", "layer2.0.conv1"):
        assert again.bits_for(name) == config.bits_for(name)
    assert config.bits_for("layer1.0.conv1") == 2 and config.bits_for("layer1.1.conv2") == 4
    assert config.bits_for("layer2.0.conv1") is None


def test_none_fields_are_null_in_json():
    loaded = json.loads(ADQConfig(activation_bits=None, first_layer_bits=None, last_layer_bits=None).to_json_string())
    for key in ("activation_bits", "first_layer_bits", "last_layer_bits", "target_avg_bits"):
        assert key in loaded and loaded[key] is None
    assert ADQConfig.from_dict(loaded).first_layer_bits is None


def test_name_matching_rules():
    config = ADQConfig(layer_bits={"fc": 2, r"layer\d\.0\.conv1": 3}, modules_to_not_convert=["head", r".*\.downsample\..*"])
    assert config.bits_for("fc") == 2 and config.bits_for("fc2") is None  # full match, not prefix
    assert config.bits_for("layer3.0.conv1") == 3 and config.bits_for("layer3.0.conv10") is None
    assert config.is_excluded("head") and config.is_excluded("head.fc")  # a name covers its children
    assert not config.is_excluded("header")
    assert config.is_excluded("layer2.0.downsample.1") and not config.is_excluded("layer2.0.conv1")


def test_registered_with_transformers():
    integration = pytest.importorskip("adq_hf.integrations.transformers")
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        AutoQuantizationConfig,
    )

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["adq"] is ADQConfig
    assert AUTO_QUANTIZER_MAPPING["adq"] is integration.ADQHfQuantizer
    config = AutoQuantizationConfig.from_dict(_rich_config().to_dict())
    assert isinstance(config, ADQConfig) and config == _rich_config()
    integration.register()  # idempotent
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["adq"] is ADQConfig
    assert AUTO_QUANTIZER_MAPPING["adq"] is integration.ADQHfQuantizer
