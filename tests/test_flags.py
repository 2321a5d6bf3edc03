"""Flags derived from config dataclasses: one declaration per option."""

import argparse
from dataclasses import asdict, dataclass, fields

import pytest

from eva_repro.flow import transport
from eva_repro.training.train_config import TrainConfig, config_from_args, configure_parser
from eva_repro.utils.flags import add_flags, option, values


@dataclass
class Inner:
    shift: float = option(1.0, "inner help")


@dataclass
class Example:
    path: str = option("", "where", group="io", aliases=["--old_path"], required=True)
    steps: int | None = option(None, "how many")
    rate: float = option(0.5, group="numbers")
    mode: str = option("a", choices=["a", "b"])
    checks: bool = option(True, "run the checks", aliases=["--unchecked"])
    fast: bool = option(False, "go fast")
    tags: dict = option(factory=dict, flag="--tag", repeat=True, metavar="K=V")
    inner: Inner = option(factory=Inner, group="nested")


def parser_for(config) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_flags(p, config)
    return p


def test_flags_take_type_default_alias_choices_and_negated_switches_from_the_fields():
    p = parser_for(Example())
    args = p.parse_args(["--old_path", "x", "--steps", "3", "--no_checks", "--fast", "--tag", "a=1",
                         "--tag", "b=2", "--shift", "2.5"])
    assert vars(args) == {"path": "x", "steps": 3, "rate": 0.5, "mode": "a", "checks": False,
                          "fast": True, "tags": ["a=1", "b=2"], "shift": 2.5}
    defaults = p.parse_args(["--path", "y"])
    assert defaults.steps is None and defaults.checks is True and defaults.fast is False
    assert values(defaults, Example) == {k: v for k, v in vars(defaults).items()}
    assert p.parse_args(["--path", "y", "--no_checks", "--checks"]).checks is True  # the last wins
    assert p.parse_args(["--path", "y", "--unchecked"]).checks is False  # an alias turns it off
    # a switch that is on by default: its help says what it does on, beside both spellings
    help_text = " ".join(p.format_help().split())
    assert "--checks, --no_checks, --unchecked run the checks (default: on)" in help_text
    with pytest.raises(SystemExit):
        p.parse_args(["--path", "y", "--mode", "c"])  # not a choice
    with pytest.raises(SystemExit):
        p.parse_args([])  # --path is required


def test_a_group_holds_until_the_next_field_names_another():
    p = parser_for(Example())
    titles = {g.title: [a.dest for a in g._group_actions] for g in p._action_groups}
    assert titles["io"] == ["path", "steps"]
    assert titles["numbers"] == ["rate", "mode", "checks", "fast", "tags"]
    assert titles["nested"] == ["shift"]


def test_an_excluded_field_gets_no_flag_and_opens_no_group():
    p = argparse.ArgumentParser()
    add_flags(p, Example(), exclude=["path", "rate"])
    titles = {g.title: [a.dest for a in g._group_actions] for g in p._action_groups}
    assert "numbers" not in titles and "io" not in titles
    assert {"steps", "mode", "checks", "fast", "tags"} <= set(titles["options"])
    assert "path" not in vars(p.parse_args([]))


def test_evaluate_and_sample_share_the_sampler_flags_and_their_named_settings():
    from eva_repro.evaluation import evaluate, generate

    for configure in (evaluate.configure_parser, generate.configure_parser):
        p = argparse.ArgumentParser()
        configure(p)
        titles = {g.title: [a.dest for a in g._group_actions] for g in p._action_groups}
        assert titles["sampler"] == ["sampler", "method", "steps", "shift", "cfg_scale", "seed"]
    args = p.parse_args(["--model_path", "m", "--input_dir", "i", "--output_dir", "o",
                         "--sampler", "blip3o", "--seed", "3", "--no_progress"])
    generate.resolve_sampler(args)
    assert (args.method, args.steps, args.cfg_scale, args.seed, args.progress) == (
        "euler", 30, 3.0, 3, False)
    args = p.parse_args(["--model_path", "m", "--input_dir", "i", "--output_dir", "o"])
    generate.resolve_sampler(args)
    assert {k: getattr(args, k) for k in generate.SAMPLER_DEFAULTS} == {
        "method": "heun", "steps": 20, "shift": 1.0, "cfg_scale": 1.0, "seed": 0}


def flag_names(config) -> set[str]:
    names = set()
    for f in fields(config):
        value = getattr(config, f.name)
        names |= flag_names(value) if hasattr(value, "__dataclass_fields__") else {f.name}
    return names


def test_every_training_option_is_a_flag_and_the_defaults_round_trip():
    p = argparse.ArgumentParser()
    configure_parser(p)
    assert {a.dest for a in p._actions} - {"help"} == flag_names(TrainConfig())
    cfg = config_from_args(p.parse_args(["--data_dir", "d", "--output_dir", "o"]))
    assert asdict(cfg) == asdict(TrainConfig(data_dir="d", output_dir="o"))
    cfg = config_from_args(p.parse_args([
        "--chunked_embeddings_dir", "d", "--output_dir", "o", "--lr", "2e-3", "--no_progress",
        "--time_mean", "-1", "--model_override", "depth=2", "--gradient_accumulation_steps", "4"]))
    assert (cfg.data_dir, cfg.learning_rate, cfg.progress, cfg.grad_accum) == ("d", 2e-3, False, 4)
    assert cfg.flow == transport.FlowConfig(time_mean=-1.0) and cfg.model_overrides == {"depth": 2}


def test_unset_flags_parse_to_none_so_a_recipe_can_fill_them_and_help_names_the_default():
    p = argparse.ArgumentParser()
    add_flags(p, Example(), unset=True, exclude=["path"])
    args = p.parse_args(["--mode", "b"])
    assert (args.rate, args.mode, args.checks, args.shift) == (None, "b", True, None)
    assert "default: 0.5" in p.format_help() and "inner help (default: 1.0)" in p.format_help()
