import json

import pytest
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import adq_hf
from adq_hf import ADQConfig
from adq_hf.integrations.transformers import ADQHfQuantizer


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        ({"weight_bits": 1}, "weight_bits", "2 to 8"),
        ({"weight_bits": 9}, "weight_bits", "2 to 8"),
        ({"weight_bits": "4"}, "weight_bits", "2 to 8"),
        ({"weight_bits": True}, "weight_bits", "2 to 8"),
        ({"activation_bits": 0}, "activation_bits", "or None"),
        ({"first_layer_bits": 16}, "first_layer_bits", "or None"),
        ({"weight_quantizer": "kmeans"}, "weight_quantizer", "'adq'"),
        ({"activation_quantizer": "pact"}, "activation_quantizer", "'n2uq'"),
        ({"granularity": "per_group"}, "granularity", "per_channel"),
        ({"codebook_init": "kmeans"}, "codebook_init", "quantile"),
        ({"codebook_update": "sgd"}, "codebook_update", "static"),
        ({"ema_decay": 0}, "ema_decay", "(0, 1)"),
        ({"ema_decay": 1.0}, "ema_decay", "(0, 1)"),
        ({"ema_update_interval": 0}, "ema_update_interval", ">= 1"),
        ({"layer_bits": {"layer1.*": 9}}, "layer_bits", "2 to 8"),
        ({"layer_bits": {"(": 4}}, "layer_bits", "regex"),
        ({"layer_bits": [4]}, "layer_bits", "dict"),
        ({"modules_to_not_convert": ["fc["]}, "modules_to_not_convert", "regex"),
        ({"target_avg_bits": 1.5}, "target_avg_bits", "2 to 8"),
        ({"quant_method": "gptq"}, "quant_method", "'adq'"),
    ],
)
def test_invalid_fields_name_field_and_allowed_values(kwargs, field, allowed):
    with pytest.raises(ValueError) as err:
        ADQConfig(**kwargs)
    assert field in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize("name, field", [("post", "weight_quantizer"), ("asq", "activation_quantizer")])
def test_planned_methods_say_not_available_yet(name, field):
    with pytest.raises(ValueError, match="planned but not available"):
        ADQConfig(**{field: name})


def test_unknown_field_is_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['wbits'\].*weight_bits"):
        ADQConfig(wbits=2)


def test_exact_json_round_trip():
    config = ADQConfig(
        weight_bits=3, activation_bits=None, weight_quantizer="lsq", activation_quantizer="lsq",
        layer_bits={"layer1\\..*": 2, "fc": 8}, modules_to_not_convert=["head"], first_layer_bits=None,
        last_layer_bits=6, granularity="per_channel", codebook_init="uniform", codebook_update="static",
        ema_decay=0.999, ema_update_interval=4, target_avg_bits=2.8,
    )
    as_dict = config.to_dict()
    assert as_dict["quant_method"] == "adq" and as_dict["activation_bits"] is None
    again = ADQConfig.from_dict(json.loads(config.to_json_string(use_diff=False)))
    assert again.to_dict() == as_dict
    assert ADQConfig.from_dict(json.loads(config.to_json_string())) == config
    assert ADQConfig.from_dict(ADQConfig().to_dict()) == ADQConfig()


def test_registered_with_transformers_and_reimport_is_harmless():
    import importlib

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["adq"] is ADQConfig
    assert AUTO_QUANTIZER_MAPPING["adq"] is ADQHfQuantizer
    adq_hf.integrations.transformers.register()
    importlib.reload(adq_hf.models)  # timm registration guarded too
    assert AUTO_QUANTIZER_MAPPING["adq"] is ADQHfQuantizer
