import pytest

import zc
from zc import ZcConfig
from zc.config import option_schema, pass_names


def test_defaults_have_every_pass_off():
    config = ZcConfig.from_options(None)
    assert config.enabled_passes() == []
    assert pass_names() == ["cleanup", "window_attention", "token_skip", "step_cache", "quantize", "op_grouping"]


def test_true_means_defaults_and_dicts_enable():
    assert ZcConfig.from_options({"cleanup": True}).enabled_passes() == ["cleanup"]
    assert ZcConfig.from_options({"cleanup": {}}).cleanup.enabled
    assert not ZcConfig.from_options({"cleanup": {"enabled": False}}).cleanup.enabled


def test_unknown_option_names_it_suggests_and_lists_valid_ones():
    with pytest.raises(ValueError) as error:
        ZcConfig.from_options({"quantise": "w8a8"})
    message = str(error.value)
    assert "'quantise'" in message and "Did you mean 'quantize'?" in message
    for name in ("dump", "strict", "inductor", *pass_names()):
        assert name in message


def test_unknown_sub_option_is_named_with_its_pass():
    with pytest.raises(ValueError, match=r"unknown option 'cleanup\.enabeld'.*Did you mean 'cleanup\.enabled'"):
        ZcConfig.from_options({"cleanup": {"enabeld": True}})


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"strict": "yes"}, r"option 'strict' must be bool, got str"),
        ({"dump": 3}, r"option 'dump' must be str \| None, got int"),
        ({"cleanup": 3}, r"option 'cleanup' must be True, False, a dict"),
        ({"inductor": ["freezing"]}, r"option 'inductor' must be Mapping"),
    ],
)
def test_wrong_types_are_refused_with_the_key(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        ZcConfig.from_options(options)


def test_inductor_patches_are_checked_against_inductor_config():
    assert ZcConfig.from_options({"inductor": {"freezing": True}}).inductor == {"freezing": True}
    with pytest.raises(ValueError, match="unknown Inductor config name 'freezin'.*Did you mean 'freezing'"):
        ZcConfig.from_options({"inductor": {"freezin": True}})


def test_quantize_shorthand_and_list_fields():
    config = ZcConfig.from_options({"quantize": "int4_weight_only"}, environ={}).quantize
    assert config.enabled and config.mode == "int4_weight_only"
    assert ZcConfig.from_options({"quantize": {"skip": ["pooler.*"]}}, environ={}).quantize.skip == ("pooler.*",)


def test_config_object_is_accepted_as_options():
    config = ZcConfig(strict=True, cleanup=zc.CleanupConfig(enabled=True))
    assert ZcConfig.from_options(config, environ={}) == config


def test_environment_overrides_options():
    environ = {"ZC_DUMP": "/tmp/zc-dump", "ZC_STRICT": "1", "ZC_CLEANUP": "off",
               "ZC_INDUCTOR": '{"freezing": true}', "PATH": "/bin"}
    config = ZcConfig.from_options({"cleanup": True, "strict": False}, environ=environ)
    assert config.dump == "/tmp/zc-dump" and config.strict is True
    assert not config.cleanup.enabled and config.inductor == {"freezing": True}
    assert ZcConfig.from_options(None, environ={"ZC_DUMP": ""}).dump is None


def test_unknown_environment_variable_is_an_error():
    with pytest.raises(ValueError, match="unknown environment variable 'ZC_DUMPP'.*Did you mean 'ZC_DUMP'"):
        ZcConfig.from_options(None, environ={"ZC_DUMPP": "x"})


def test_cache_key_covers_passes_and_inductor_but_not_dump():
    base = ZcConfig.from_options(None, environ={})
    assert base.cache_key() == ZcConfig.from_options({"dump": "/tmp/x"}, environ={}).cache_key()
    assert base.cache_key() != ZcConfig.from_options({"cleanup": True}, environ={}).cache_key()
    assert base.cache_key() != ZcConfig.from_options({"inductor": {"freezing": True}}, environ={}).cache_key()


def test_schema_lists_every_option():
    schema = option_schema()
    assert schema["dump"] == {"type": "str | None", "default": None}
    assert schema["cleanup"]["type"] == "pass"
    assert schema["token_skip"]["fields"]["keep_ratio"]["type"] == "float"
