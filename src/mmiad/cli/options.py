"""Method hyperparameters on the command line, built from each method's config class (no option list kept here).

Every field of a method's config is an option (``grid_size`` → ``--grid-size``) and a ``--set`` key; its type,
default and help come from the config dataclass (:mod:`mmiad.methods.hparams`). The parser holds the options of
every registered method, so any method's options parse, but ``--help`` describes only the method named on the
command line (``mmiad train --method unircm --help``; ``cfm`` by default): one method's help never shows
another's. Values are text until :func:`hparams_from_args` types them against the chosen method's config, so a
wrong value is one line naming the key, the value and what is allowed (exit 2), never an argparse usage dump.

With ``--run``, ``test`` and ``predict`` take only the settings that still apply to a trained model
(:func:`run_overrides`); everything else is refused, naming the key.
"""

from __future__ import annotations

import argparse
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmiad.methods.hparams import (
    Hparam,
    HparamError,
    build_settings,
    check_hparams,
    check_overrides,
    describe,
    hparams_of,
    parse_text,
    show,
)

#: Inference-time settings that leave the scores as the run's thresholds were calibrated for: where the model
#: computes and where its checkpoint files are on this machine.
SCORE_NEUTRAL_KEYS = frozenset({"device", "weights_dir"})
#: Extra spellings kept for options users already type.
ALIASES = {"learning_rate": ("--lr",)}
_GENERATED = "_hparam_options"


def method_hint(argv: Sequence[str] | None) -> str | None:
    """The value of ``--method`` on a command line (to show that method's help), or None."""
    args = list(argv or [])
    for index, arg in enumerate(args):
        if arg == "--method" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--method="):
            return arg.partition("=")[2]
    return None


def method_config(method: str) -> type:
    """The config class of a registered method; an unknown method is a usage error listing the known ones."""
    import mmiad.methods  # noqa: F401  (fills the registry)
    from mmiad.methods.registry import available_methods, get_method

    if method not in available_methods():
        raise HparamError(f"unknown method {method!r}; available: {', '.join(available_methods())}")
    return get_method(method).config_class


_ROLE = re.compile(r":\w+:`~?([^`]*)`")


def _help(hparam: Hparam) -> str:
    """The docstring's description as plain text (no reST markup), with the type and the default."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], hparam.help).replace("``", "").rstrip(".")
    return f"{text or hparam.name} [{describe(hparam.hint)}; default {show(hparam.default)}]".replace("%", "%%")


def _metavar(hint: Any) -> str:
    kinds = set(typing.get_args(hint) or (hint,)) - {type(None)}
    names = {bool: "BOOL", int: "N", float: "X", str: "TEXT"}
    return names[next(iter(kinds))] if len(kinds) == 1 and next(iter(kinds)) in names else "JSON"


def add_hparam_options(parser: argparse.ArgumentParser, method: str | None, *, what: str) -> None:
    """Add one option per hyperparameter of every registered method, described for ``method`` only, and ``--set``.

    Options the command defines itself (``--extractors``, ``--seed``...) are left as they are.

    Args:
        parser: The sub-command's parser.
        method: The method whose options ``--help`` describes (None: none, with a pointer to ``--method M``).
        what: How the command uses the hyperparameters, for the group's title (``training``, ``the import``).
    """
    import mmiad.methods  # noqa: F401  (fills the registry)
    from mmiad.methods.registry import available_methods, get_method

    shown = hparams_of(get_method(method).config_class) if method in available_methods() else []
    others = [h for name in available_methods() for h in hparams_of(get_method(name).config_class)]
    title = f"{method} hyperparameters" if shown else "method hyperparameters"
    group = parser.add_argument_group(
        title,
        f"for {what}; each is also a --set KEY (the field name). `--method M --help` lists M's "
        f"({', '.join(available_methods())}).",
    )
    taken = set(parser._option_string_actions)
    added: list[str] = []
    for hparam in [*shown, *others]:
        if hparam.option in taken or hparam.name in added:
            continue
        visible = any(h.name == hparam.name for h in shown)
        flags = [hparam.option, *(a for a in ALIASES.get(hparam.name, ()) if a not in taken)]
        boolean = bool in (typing.get_args(hparam.hint) or (hparam.hint,))
        group.add_argument(
            *flags,
            dest=hparam.name,
            default=None,
            nargs="?" if boolean else None,
            const="true" if boolean else None,
            metavar=_metavar(hparam.hint),
            help=_help(hparam) if visible else argparse.SUPPRESS,
        )
        added.append(hparam.name)
    parser.set_defaults(**{_GENERATED: tuple(added)})
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help=f"any hyperparameter of the method by its field name, e.g. --set grid_size=56 (repeatable; typed as "
        f"the options of the method: JSON numbers, lists and objects, true/false; text as it is). An unknown key "
        f"fails and lists the valid ones{f'; {method} takes the keys listed here' if shown else ''}",
    )


def split_assignments(assignments: Sequence[str] | None) -> dict[str, str]:
    """``--set KEY=VALUE`` options as ``{key: text}`` (dashes in keys become underscores).

    Raises:
        HparamError: for an assignment without ``=`` or without a key.
    """
    found: dict[str, str] = {}
    for assignment in assignments or []:
        key, separator, value = assignment.partition("=")
        if not separator or not key.strip():
            raise HparamError(f"--set expects KEY=VALUE, got {assignment!r}")
        found[key.strip().replace("-", "_")] = value
    return found


def typed_assignments(config_class: type, texts: Mapping[str, str], *, owner: str) -> dict[str, Any]:
    """Text values typed by their field (``false`` → False, ``[1, 3]`` → a list); an unknown key is refused.

    Raises:
        HparamError: for a key that is not a field of ``config_class`` (listing the valid ones).
    """
    fields = {h.name: h for h in hparams_of(config_class)}
    values = {}
    for key, text in texts.items():
        if key not in fields:
            check_hparams(config_class, {key: text}, owner=owner)  # raises, listing the valid keys
        values[key] = parse_text(text, fields[key].hint)
    return values


def hparams_from_args(args: argparse.Namespace, method: str, fixed: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters a command line gives for ``method``: the generated options, then ``fixed`` (the
    command's own options, already typed), then ``--set``; each checked against the method's config (type and
    range), so a wrong value fails before any data is read.

    Raises:
        HparamError: one line naming the key, the value and what is allowed.
    """
    config_class = method_config(method)
    texts = {
        name: getattr(args, name) for name in getattr(args, _GENERATED, ()) if getattr(args, name, None) is not None
    }
    values = typed_assignments(config_class, texts, owner=method)
    values.update(fixed)
    values.update(typed_assignments(config_class, split_assignments(getattr(args, "set", None)), owner=method))
    checked = check_hparams(config_class, values, owner=method)
    build_settings(config_class, checked, owner=method)  # the ranges too, before any data is read
    return checked


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--set`` (and ``--weights-dir``) settings of ``test``/``predict --run``, checked against the run's
    method: only its inference-time keys are accepted; ``--extractors`` and ``--random-init`` are refused.

    Raises:
        HparamError: naming the option or key that cannot change a trained model.
    """
    for option in ("extractors", "random_init"):
        if getattr(args, option, None):
            flag = "--" + option.replace("_", "-")
            raise HparamError(
                f"{flag} cannot change a trained run: its models keep the extractors they were trained with "
                f"(see {Path(args.run) / 'run.json'}); drop {flag}, or train a new run with it"
            )
    texts = split_assignments(getattr(args, "set", None))
    if getattr(args, "weights_dir", None):
        texts["weights_dir"] = args.weights_dir
    if not texts:
        return {}
    from mmiad.engine.runs import read_run_index

    method = str(read_run_index(args.run).get("method"))
    config_class = method_config(method)
    return check_overrides(config_class, typed_assignments(config_class, texts, owner=method), owner=method)


def describe_settings(settings: Mapping[str, Any]) -> str:
    """``aggregation=sum, sigma=2`` for the console line that records the applied settings."""
    return ", ".join(f"{k}={show(v)}" for k, v in sorted(settings.items()))


def rescoring(settings: Mapping[str, Any]) -> bool:
    """Whether inference settings change the scores (any key but ``device`` and ``weights_dir``): the run's
    thresholds were calibrated without them, so they no longer label anything."""
    return bool(set(settings) - SCORE_NEUTRAL_KEYS)
