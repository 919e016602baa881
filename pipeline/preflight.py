"""Command-line pre-flight: check what Hydra would only get wrong (or silently merge) at compose time.

``python run.py`` calls :func:`preflight_or_exit` before Hydra's main, so these fail at once with
one line ``netcompress: error: ...`` on stderr and exit status 2, before any output folder exists:

* ``compression=[...]`` (every sweep option of ``-m 'compression=[],[a,b]'`` too): each entry is a
  ``conf/compression/<entry>.yaml`` and appears once per list (Hydra merges ``[x,x]`` into one);
* typed values (``seed=abc``, ``optimizer.lr=-0.1``, every sweep option too) against the fields of
  ``config_checks.FIELDS``;
* ``callbacks.<entry>.<key>=`` / ``+callbacks.<entry>.<key>=``: ``key`` is an argument of the
  entry's callback class (its ``_target_`` in ``conf/compression`` or ``conf/callbacks``), and a
  compression entry overridden without ``+`` is in this command's ``compression=[...]``.

The same list check runs again inside the job (``config_checks.check_compression_list``), so
tests that compose configs in-process get it too.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable

from hydra.core.override_parser.types import ValueType

from netcompress.pipeline.config_checks import FIELDS
from netcompress.pipeline.entries import (CONF_DIR, HYDRA_KEYS, accepted_keys, callback_targets, compression_entries,
                              did_you_mean, locate, unknown_key_message)

# Flags after which the pre-flight cannot know the config (another config file or folder), or
# that do not run a job at all.
_SKIP_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--version", "--help",
               "-h", "--hydra-help", "--shell-completion", "-sc", "--experimental-rerun")


class CommandLineError(ValueError):
    """A command-line override that cannot work; the message names it and what is valid."""


def command_line_overrides(argv: list[str]) -> list[str] | None:
    """The ``key=value`` overrides in ``argv`` as Hydra reads them; None when a flag makes the check moot."""
    if any(arg.split("=", 1)[0] in _SKIP_FLAGS for arg in argv):
        return None
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        args, _ = parser.parse_known_args(argv)
    except Exception:  # Hydra will report its own usage error
        return None
    return list(args.overrides or [])


def _as_lists(override: Any) -> list[list[Any]] | None:
    """The compression lists one override asks for (one per sweep option); None for globs/deletes."""
    if override.is_delete() or override.value_type is None:
        return None
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        return None
    if override.is_discrete_sweep():
        options = list(override.sweep_iterator())
    else:
        options = [override.value()]
    return [option if isinstance(option, list) else [option] for option in options]


def _format_list(entries: list[Any]) -> str:
    return "[" + ",".join(str(e) for e in entries) + "]"


def check_compression_lists(lists: list[list[Any]], valid: list[str]) -> None:
    for entries in lists:
        for entry in entries:
            if not isinstance(entry, str) or entry not in valid:
                hint = did_you_mean(str(entry), valid)
                raise CommandLineError(
                    f"compression={_format_list(entries)}: no compression entry {entry!r}{hint}; "
                    f"valid entries (conf/compression/*.yaml): {', '.join(valid)}")
        twice = sorted({e for e in entries if entries.count(e) > 1})
        if twice:
            raise CommandLineError(
                f"compression={_format_list(entries)}: {', '.join(twice)} appears twice; list each entry once "
                f"(Hydra would merge the copies into one callback), e.g. "
                f"compression={_format_list(list(dict.fromkeys(entries)))}")


def check_typed_value(override: Any, field: Any) -> None:
    """``seed=abc``, ``optimizer.lr=-0.1``: every value (each sweep option) against its typed field."""
    if override.is_delete() or override.value_type is None:
        return
    if override.is_sweep_override():
        if not override.is_discrete_sweep() or override.value_type == ValueType.GLOB_CHOICE_SWEEP:
            return  # interval(...) and glob(...): the sweeper's business
        values = list(override.sweep_iterator())
    else:
        values = [override.value()]
    for value in values:
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: resolved (and checked) in the composed config
        if not field.check(value):
            raise CommandLineError(f"`{field.key}` must be {field.allowed}; got {value!r} (e.g. {field.example})")


def _callback_override(override: Any) -> tuple[str, str] | None:
    """(entry, key) of a ``callbacks.<entry>.<key>...`` override, else None."""
    parts = override.key_or_group.split(".")
    if len(parts) < 3 or parts[0] != "callbacks" or override.package is not None:
        return None
    return parts[1], parts[2]


def check_callback_overrides(overrides: list[Any], compression_lists: list[list[Any]] | None,
                             other_sources: bool) -> None:
    """Each overridden ``callbacks.<entry>.<key>`` is an argument of the entry's class."""
    targets = dict(callback_targets(CONF_DIR))
    for override in overrides:  # +callbacks.x._target_=... on this command line defines entry x
        found = _callback_override(override)
        if found and found[1] == "_target_" and isinstance(override.value(), str):
            targets[found[0]] = override.value()
    compression = set(compression_entries(CONF_DIR))
    for override in overrides:
        found = _callback_override(override)
        if found is None or override.is_delete():
            continue
        entry, key = found
        if key in HYDRA_KEYS or entry not in targets:
            continue  # an entry only a preset defines: the config checks see it after composing
        try:
            valid = accepted_keys(locate(targets[entry]))
        except Exception:
            continue  # the config checks report an unimportable _target_
        if valid is not None and key not in valid:
            raise CommandLineError(unknown_key_message(f"callbacks.{entry}", key, targets[entry], valid))
        if entry in compression and not other_sources:
            in_every = compression_lists is not None and all(entry in entries for entries in compression_lists)
            if not in_every:
                if compression_lists is None or len(compression_lists) == 1:
                    where = "compression=[...]" if compression_lists is None else _format_list(compression_lists[0])
                    raise CommandLineError(
                        f"{override.input_line}: {entry} is not in {where}, so this value would be ignored; "
                        f"add {entry} to the list, e.g. compression=[{entry}]")
                options = " / ".join(_format_list(e) for e in compression_lists)
                raise CommandLineError(
                    f"{override.input_line}: {entry} is not in every option of the sweep compression={options}, "
                    f"and the jobs without it cannot take this value; sweep {entry}'s settings in a preset "
                    "(experiment=...) or run the options as separate sweeps")


def check_overrides(overrides: list[str], callback_keys: bool = True) -> None:
    """Raise :class:`CommandLineError` for the first override that cannot work as intended."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # a syntax error: Hydra reports it with the grammar's help
        return
    valid = compression_entries(CONF_DIR)
    lists: list[list[Any]] | None = None
    fields = {f.key: f for f in FIELDS}
    for override in parsed:
        field = fields.get(override.key_or_group)
        if field is not None:
            check_typed_value(override, field)
        if override.key_or_group == "compression":
            found = _as_lists(override)
            if found is not None:
                check_compression_lists(found, valid)
                lists = found
    if callback_keys:
        # Presets, a search space or a protocol may add compression entries this check cannot see.
        other_sources = any(o.key_or_group.split("/")[0] in ("experiment", "hparams_search", "protocol")
                            and not o.is_delete() for o in parsed)
        check_callback_overrides(parsed, lists, other_sources)


def preflight_or_exit(argv: Iterable[str] | None = None) -> None:
    """Check ``argv`` (default ``sys.argv[1:]``); on a problem print one line to stderr and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = command_line_overrides(argv)
    if not overrides:
        return
    try:
        check_overrides(overrides)
    except CommandLineError as exc:
        print(f"netcompress: error: {exc}", file=sys.stderr)
        sys.exit(2)
