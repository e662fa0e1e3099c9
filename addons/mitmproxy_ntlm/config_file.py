"""The config file of `mitm-ntlm start`: where it lives by default, and applying it to options.

It is mitmproxy's config.yaml format (mitmproxy and ntlm_* options). The addon reads it itself
(option `ntlm_config`), at start and on SIGHUP, so no value from it (a hash, a password) ever
reaches a command line. Options named in `ntlm_config_keep` (the command-line flags of
`mitm-ntlm start`) win over the file. On a reload only what differs from the running values is
applied; an option removed from the file goes back to its default. A bad value is refused as a
bad `--set` is: mitmproxy rolls every option of the update back.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mitmproxy import exceptions, optmanager
from mitmproxy.utils import typecheck

from . import mitmproxy_internals, options
from .credentials import CredentialError, require_private
from .userfile import FileRefused, read_regular_file

APP = "mitm-ntlm"
START_ONLY = frozenset({"scripts", "confdir", "ntlm_config", "ntlm_config_keep"})
"""Options the file cannot set: they decide what is loaded and from where, before it is read."""


def default_config_paths() -> list[Path]:
    """Where `mitm-ntlm start` looks for config.yaml without --config, first found wins."""
    home = Path.home()
    if sys.platform == "win32":
        appdata = os.environ.get("APPDATA") or str(home / "AppData" / "Roaming")
        return [Path(appdata) / APP / "config.yaml"]
    if sys.platform == "darwin":
        return [home / "Library" / "Application Support" / APP / "config.yaml",
                Path("/etc") / APP / "config.yaml"]
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(home / ".config")
    return [Path(xdg) / APP / "config.yaml", Path("/etc") / APP / "config.yaml"]


def find_config(explicit: str | None) -> Path | None:
    """The --config file (absolute), else the first default place holding a file, else None."""
    if explicit:
        return Path(explicit).expanduser().absolute()
    return next((p for p in default_config_paths() if p.is_file()), None)


def read_config(path: str | Path) -> dict[str, Any]:
    """The file's options (a mapping of names to YAML values); OptionsError naming the file."""
    opened: list[os.stat_result] = []
    try:
        text = read_regular_file(str(path), "config file", check=opened.append).decode("utf-8")
    except FileRefused as e:
        raise exceptions.OptionsError(str(e)) from None
    except UnicodeDecodeError:
        raise exceptions.OptionsError(f"config file {path} is not UTF-8") from None
    try:
        data = optmanager.parse(text)
    except exceptions.OptionsError as e:
        raise exceptions.OptionsError(f"config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise exceptions.OptionsError(f"config file {path}: expected `option: value` lines")
    secrets = sorted(set(map(str, data)) & set(options.SECRET))
    if secrets:
        _require_private(opened[0], path, secrets)
    return {str(k): v for k, v in data.items()}


def _require_private(st: os.stat_result, path: str | Path, secrets: list[str]) -> None:
    """A file holding a password or hash must be its owner's alone, as a password file."""
    try:
        require_private(st, f"config file {path} (it sets {', '.join(secrets)})", str(path))
    except CredentialError as e:
        raise exceptions.OptionsError(str(e)) from None


def changes(opts: optmanager.OptManager, path: str | Path, keep: Iterable[str],
            previous: Iterable[str] = ()) -> tuple[dict[str, Any], set[str]]:
    """What applying the file would change: {option: value}, and the names the file sets.

    `previous` are the names the file set last time: those it no longer sets go back to their
    defaults. Unknown names and values of the wrong type raise OptionsError (nothing applied)."""
    data = read_config(path)
    kept = set(keep) | START_ONLY
    known = set(opts.keys())
    unknown = sorted(set(data) - known)
    if unknown:
        raise exceptions.OptionsError(
            f"config file {path}: {'; '.join(options.unknown(n, known) for n in unknown)}")
    wanted: dict[str, Any] = {}
    for name, value in data.items():
        if name in kept:
            continue
        try:
            wanted[name] = _typed(opts, name, value)
        except (TypeError, exceptions.OptionsError) as e:
            raise exceptions.OptionsError(f"config file {path}: {e}") from None
    for name in set(previous) - set(wanted) - kept:
        if name in known:
            wanted[name] = opts.default(name)
    update = {name: value for name, value in wanted.items()
              if _comparable(getattr(opts, name)) != _comparable(value)}
    return update, set(data) - kept


def _typed(opts: optmanager.OptManager, name: str, value: Any) -> Any:
    """The value in the option's type (ours converted as from --set); TypeError if wrong."""
    if value is None:
        return opts.default(name)
    if name in options.BY_NAME:
        return options.convert(name, value)
    typecheck.check_option_type(name, value, mitmproxy_internals.option_typespec(opts, name))
    return value


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
