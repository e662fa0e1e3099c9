"""`mitm-ntlm`: start the proxy in one command, and the CNTLM helpers (hash, detect, import).

`start`: the proxy itself is plain `mitmdump -s "$(mitm-ntlm script)" ...`; this wrapper only
assembles that command line from its flags and a config file in a known place (read by the
addon, reloaded on SIGHUP), keeps the password out of it (it goes through the environment), and
in demo mode first starts the project's password-checking test parent. Without the demo it
execs mitmdump, so a service manager's signals reach mitmproxy itself.
Like CNTLM and Px it passes HTTPS through untouched unless `--intercept` names hosts.
`script`, `configs` and `ca` print where the installed script, the example configs and
mitmproxy's CA are.
`hash`, `detect` and `import-cntlm` do what `cntlm -H`, `cntlm -M` and a hand-made config
translation do for people moving from CNTLM.
`password` stores the password in the OS keyring (like Px's --password), for
ntlm_password_keyring.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from mitmproxy import exceptions

from . import options
from .allocator import CHOICES as ALLOCATORS
from .allocator import AllocatorError, find_jemalloc, with_allocator
from .cntlm_import import cntlm_hashes, cntlm_hex, convert, hash_lines, yaml_scalar
from .config_file import default_config_paths, find_config, read_config
from .credentials import (
    CredentialError,
    SecretSources,
    build_credentials,
    principal_of,
    read_secret_file,
    split_principal,
)
from .detect import DetectError, detect
from .handshake import Dialect
from .interception import InterceptError, tls_options
from .keychain import (
    KeychainError,
    backend_name,
    delete_password,
    has_password,
    store_password,
)
from .locations import ADDON_SCRIPT, DEFAULT_CONFDIR, example_configs, mitmproxy_ca
from .trust_hints import trust_instructions
from .userfile import FileRefused, read_regular_file
from .versions import version_report
from .workers import create_ca, run_workers, worker_command, worker_settings

PASSWORD_ENV = "MITM_NTLM_PASSWORD"


def mitm_tool(tool: str) -> str:
    beside = Path(sys.executable).parent / tool
    return str(beside) if beside.exists() else (shutil.which(tool) or tool)


SECRET_OPTIONS = options.SECRET_SOURCES
"""Options that give the password: with one of them set (file or --set), `start` does not ask."""
NO_PASSWORD_OPTIONS = ("ntlm_multiuser", "ntlm_winbind", "ntlm_kerberos_ccache",
                       "ntlm_kerberos_keytab")
"""Options under which the identity needs no password from `start`: the clients' own (multi-user),
winbind's cached logon, or Kerberos tickets."""


def chosen_options(args: argparse.Namespace, file_options: dict[str, Any]) -> dict[str, Any]:
    """The config file's options with the --set ones over them (values as given)."""
    chosen = dict(file_options)
    for extra in args.set or []:
        name, _, value = extra.partition("=")
        chosen[name.strip()] = value
    return chosen


def _is_set(value: Any) -> bool:
    return bool(value) and str(value).strip().lower() not in ("false", "0", "no", "off")


def password_needed(args: argparse.Namespace, file_options: dict[str, Any]) -> bool:
    """Whether `start` must ask for the password (and pass it in its environment)."""
    chosen = chosen_options(args, file_options)
    if args.password_file or any(_is_set(chosen.get(n)) for n in SECRET_OPTIONS):
        return False
    if any(_is_set(chosen.get(n)) for n in NO_PASSWORD_OPTIONS):
        return False
    return str(chosen.get("ntlm_scheme", "")).strip().lower() != "kerberos"


def build_command(args: argparse.Namespace, parent_url: str | None, host: str, port: int,
                  config: Path | None, file_options: dict[str, Any]) -> list[str]:
    """mitmdump's command line. The config file goes by name (the addon reads it, so no value
    from it, a hash say, is ever in the process list); the options given here are named in
    ntlm_config_keep, so they win over the file, also on a reload."""
    cmd = [mitm_tool(args.tool), "-s", str(ADDON_SCRIPT), "--listen-host", host, "-p", str(port)]
    pinned = [name for name, given in (("listen_host", args.listen_host),
                                       ("listen_port", args.port)) if given is not None]
    settings: list[tuple[str, str]] = []
    if parent_url:
        cmd += ["--mode", f"upstream:{parent_url}"]
        pinned.append("mode")
    elif file_options.get("mode") and not user_sets(args, "mode"):
        # Listeners are set up from the command line at start (mitmproxy 12 does not move an
        # already started listener to a mode set later by a script), so the file's go here.
        modes = file_options["mode"]
        for mode in [modes] if isinstance(modes, str) else modes:
            cmd += ["--mode", str(mode)]
        pinned.append("mode")
    if user_sets(args, "ignore_hosts", "allow_hosts"):
        pass  # the user's choice wins
    elif args.intercept is not None:
        cmd += tls_options(args.intercept)
        pinned += ["ignore_hosts", "allow_hosts"]
    elif not tls_chosen(args, file_options):
        cmd += tls_options(None)
    if args.user:
        settings.append(("ntlm_username", args.user))
    if args.domain:
        settings.append(("ntlm_domain", args.domain))
    if args.password_file:
        settings.append(("ntlm_password_file", str(Path(args.password_file).expanduser()
                                                   .absolute())))
    elif args.user and password_needed(args, file_options):
        settings.append(("ntlm_password_env", PASSWORD_ENV))
    if any(name in SECRET_OPTIONS for name, _ in settings):
        pinned += list(SECRET_OPTIONS)  # this secret only: the file's are ignored
    if "confdir" in file_options and not user_sets(args, "confdir"):
        settings.append(("confdir", str(file_options["confdir"])))  # read before any addon
    for name, value in settings:
        cmd += ["--set", f"{name}={value}"]
        pinned.append(name)
    for extra in args.set or []:
        cmd += ["--set", extra]
        pinned.append(extra.partition("=")[0].strip())
    if config is not None:
        cmd += ["--set", f"ntlm_config={config}"]
        for name in dict.fromkeys(pinned):
            cmd += ["--set", f"ntlm_config_keep={name}"]
    return cmd


def start(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    demo = None
    try:
        tls_options(args.intercept)  # a bad --intercept fails before anything starts
        config = find_config(args.config)
        file_options = read_config(config) if config else {}
    except (InterceptError, exceptions.OptionsError) as e:
        return fail("start", str(e))
    try:
        env, memory = with_allocator(env, args.allocator, find_jemalloc())
    except AllocatorError as e:
        return fail("start", str(e))
    if args.workers < 1:
        return fail("start", f"--workers {args.workers}: give 1 or more")
    if args.workers > 1 and args.tool != "mitmdump":
        return fail("start", f"--workers runs mitmdump processes; {args.tool} has one "
                    f"window per process: use --tool mitmdump, or one worker")
    if "scripts" in file_options:
        return fail("start", f"{config} sets scripts: start loads the addon itself; give further "
                    f"scripts on the command line (--set scripts=...)")
    host = args.listen_host or str(file_options.get("listen_host") or "127.0.0.1")
    port = args.port if args.port is not None else file_options.get("listen_port", 3128)
    if not isinstance(port, int) or isinstance(port, bool):
        return fail("start", f"{config}: listen_port must be a port number, not {port!r}")
    if port_taken(host, port):  # else mitmproxy's advice is its own --mode
        return fail("start", f"port {port} on {host} is already in use (a "
                    f"proxy already running there?): choose another one with --port")
    if config is not None:
        print(f"Config file: {config} (reloaded on SIGHUP; command-line flags win over it)")
    else:
        print(f"No config file (looked for {', '.join(map(str, default_config_paths()))}; "
              f"--config FILE names one).")
    parent_url = args.parent
    if args.parent or config is not None:
        chosen = chosen_options(args, file_options)
        if args.parent and not args.user and not chosen.get("ntlm_username") \
                and password_needed(args, file_options):
            print("mitm-ntlm: --user is required with --parent (or a config file or --set "
                  "giving ntlm_username, ntlm_multiuser, ntlm_winbind or a Kerberos ticket "
                  "source)", file=sys.stderr)
            return 2
        if args.password_file:
            try:
                read_secret_file(args.password_file, "--password-file")  # fail before starting
            except CredentialError as e:
                return fail("start", str(e))
        elif args.user and password_needed(args, file_options):
            env[PASSWORD_ENV] = env.get(PASSWORD_ENV) or getpass.getpass(
                f"Password for {args.user}: ")
    else:
        from .testing.parent import ParentProxy

        args.user, args.domain = "demo", "DEMO"
        env[PASSWORD_ENV] = secrets.token_urlsafe(12)
        demo = ParentProxy({"DEMO\\demo": env[PASSWORD_ENV]}).start()
        parent_url = demo.url
        print(f"Demo: a local parent proxy that demands NTLM runs at {demo.url} "
              f"(user DEMO\\demo, random password).")
        print(f"Try:  curl -x http://{host}:{port} http://ntlm-demo.invalid/")
    if args.workers > 1:
        confdir = confdir_of(args, file_options)
        args.set = (args.set or []) + worker_settings(args, file_options, confdir, user_sets)
        create_ca(confdir)
    cmd = build_command(args, parent_url, host, port, config, file_options)
    announce_https(args, file_options)
    print(memory)
    sys.stdout.flush()  # our lines before mitmproxy's, also when stdout is a file
    if args.workers > 1:
        cmd = worker_command(cmd)
        if demo is None and os.name == "posix":  # a supervisor without mitmproxy loaded
            supervisor = [sys.executable, "-m", "mitmproxy_ntlm.workers", str(args.workers),
                          "--", *cmd]
            try:
                os.execve(sys.executable, supervisor, env)
            except OSError as e:
                return fail("start", f"cannot run {sys.executable}: {e.strerror}")
        return run_workers(cmd, env, args.workers, demo)
    if demo is None and os.name == "posix":
        try:  # mitmdump takes this process's place: a service manager signals it directly
            os.execvpe(cmd[0], cmd, env)
        except OSError as e:
            return fail("start", f"cannot run {cmd[0]}: {e.strerror}")
    return run_child(cmd, env, demo)


def run_child(cmd: list[str], env: dict[str, str], demo: Any) -> int:
    """Run mitmdump as a child (the demo parent lives in this process, or no exec on Windows):
    SIGTERM and SIGHUP go on to it, and the demo parent stops when it ends."""
    proc = subprocess.Popen(cmd, env=env)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: proc.send_signal(signal.SIGHUP))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
    finally:
        if demo is not None:
            demo.stop()


def tls_chosen(args: argparse.Namespace, file_options: dict[str, Any]) -> bool:
    """Whether --set or the config file decides what mitmproxy intercepts."""
    return user_sets(args, "ignore_hosts", "allow_hosts") or \
        any(file_options.get(name) for name in ("ignore_hosts", "allow_hosts"))


def announce_https(args: argparse.Namespace, file_options: dict[str, Any]) -> None:
    """Say what happens to HTTPS, and what to trust when it is intercepted."""
    if user_sets(args, "ignore_hosts", "allow_hosts") or \
            (args.intercept is None and tls_chosen(args, file_options)):
        print("HTTPS: your ignore_hosts/allow_hosts decide what mitmproxy intercepts.")
        print(trust_instructions(mitmproxy_ca(confdir_of(args, file_options))), end="")
        return
    if args.intercept is None:
        print("HTTPS passes through untouched (the parent still gets the NTLM CONNECT); no CA "
              "to trust. --intercept HOSTS|all lets mitmproxy decrypt it.")
        return
    what = "all HTTPS" if args.intercept.strip().lower() == "all" else f"HTTPS to {args.intercept}"
    print(f"mitmproxy intercepts {what} (other hosts pass through).")
    print(trust_instructions(mitmproxy_ca(confdir_of(args, file_options))), end="")


def user_sets(args: argparse.Namespace, *names: str) -> bool:
    """Whether a --set names one of these mitmproxy options."""
    return any(extra.partition("=")[0].strip() in names for extra in args.set or [])


def confdir_of(args: argparse.Namespace, file_options: dict[str, Any]) -> str:
    """The confdir given with --set confdir=..., else the config file's, else mitmproxy's."""
    for extra in reversed(args.set or []):
        name, _, value = extra.partition("=")
        if name.strip() == "confdir":
            return value
    return str(file_options.get("confdir") or DEFAULT_CONFDIR)


def script_command(args: argparse.Namespace) -> int:
    print(ADDON_SCRIPT)
    return 0


def configs_command(args: argparse.Namespace) -> int:
    """Print the example configs' paths, or copy them into a folder (never overwriting)."""
    configs = example_configs()
    if not args.copy:
        for path in configs:
            print(path)
        return 0
    target = Path(args.copy).expanduser()
    try:
        target.mkdir(parents=True, exist_ok=True)
        for path in configs:
            dest = target / path.name
            if dest.exists():
                print(f"mitm-ntlm configs: kept the existing {dest}", file=sys.stderr)
                continue
            shutil.copyfile(path, dest)
            print(dest)
    except OSError as e:
        return fail("configs", f"cannot copy to {target}: {e.strerror}")
    return 0


def ca_command(args: argparse.Namespace) -> int:
    print(trust_instructions(mitmproxy_ca(args.confdir)), end="")
    return 0


def port_taken(host: str, port: int) -> bool:
    """Whether mitmproxy could not listen there: bound the way asyncio's server binds."""
    if port == 0:
        return False
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # mitmproxy reports a bad host itself
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            if os.name == "posix":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError:
                return True
    return False


def fail(command: str, message: str) -> int:
    """One line on stderr, exit status 1: what the user needs to act on."""
    print(f"mitm-ntlm {command}: {message}", file=sys.stderr)
    return 1


def read_password(prompt: str) -> str:
    """getpass on a terminal (no echo); otherwise the first line of stdin, so it can be piped."""
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    line = sys.stdin.buffer.readline()
    try:
        return line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise CredentialError("the password on stdin is not UTF-8") from None


def hash_command(args: argparse.Namespace) -> int:
    user, domain = split_principal(args.user, args.domain)
    who = f"{domain}\\{user}" if domain else user or "the user"
    try:
        password = read_password(f"Password for {who}: ")
    except CredentialError as e:
        return fail("hash", str(e))
    if not password:
        return fail("hash", "no password given")
    h = cntlm_hashes(user, domain, password)
    non_ascii = not password.isascii()
    del password
    if args.standard:
        print(f"ntlm_hashes: {h.lm.hex()}:{h.nt.hex()}")
        print("# Standard (impacket/pyspnego) LM:NT form for the ntlm_hashes option. "
              "Without --standard: cntlm's form.")
        return 0
    print("\n".join(hash_lines(h)))
    print("# These are in cntlm's form (every byte inverted), as `cntlm -H` prints them:")
    print("# use PassNT as ntlm_pass_nt (and PassLM as ntlm_pass_lm, only for ntlm_dialect "
          "ntlmv1).")
    print("# PassNTLMv2 is for cntlm only. `mitm-ntlm hash --standard` prints the standard form "
          "for ntlm_hashes.")
    if non_ascii:
        print("# The password is not ASCII: PassNT/PassNTLMv2 hash it as UTF-16, as Windows does "
              "(cntlm -H agrees only on a Latin-1 terminal); LM hashes of non-ASCII passwords "
              "differ between implementations.")
    return 0


def detect_command(args: argparse.Namespace) -> int:
    try:
        if args.password_file:
            password = read_secret_file(args.password_file, "--password-file")
        else:
            password = os.environ.get(PASSWORD_ENV) or read_password(
                f"Password for {args.user}: ")
        if not password:
            raise CredentialError("no password given")
        creds = build_credentials(args.user, args.domain, args.workstation,
                                  SecretSources(password=password))
    except CredentialError as e:
        return fail("detect", str(e))
    del password
    print(f"mitm-ntlm detect: WARNING: every rejected try is a failed logon for "
          f"{creds.principal} at the domain controller (a few lock the account); "
          + ("--all tries every dialect." if args.all else "stopping at the first rejection."),
          file=sys.stderr)

    def announce(dialect: Dialect) -> None:
        print(f"mitm-ntlm detect: trying {dialect.label} as "
              f"{creds.principal} ...", file=sys.stderr)

    try:
        attempts = detect(args.parent, creds, args.url, args.all, announce)
    except DetectError as e:
        return fail("detect", str(e))
    last = attempts[-1]
    if not last.accepted:
        tried = ", ".join(a.dialect.label for a in attempts)
        more = ("" if args.all else "; --all also tries the weaker dialects, each another "
                "failed logon if the password is wrong")
        return fail("detect", f"the parent rejected the credentials of {creds.principal} "
                    f"({tried}: {len(attempts)} failed logon{'s' if len(attempts) > 1 else ''})"
                    f". Check user, domain and password{more}.")
    inside = " inside Negotiate (it offers only Negotiate)" if last.scheme == "Negotiate" else ""
    print(f"The parent accepted {last.dialect.label}{inside} for {creds.principal} "
          f"(HTTP {last.status} for {args.url}).")
    print("# config.yaml lines (or --set option=value):")
    print(f"ntlm_dialect: {last.dialect.value}")
    print(f"ntlm_username: {yaml_scalar(creds.user)}")
    if creds.domain:
        print(f"ntlm_domain: {yaml_scalar(creds.domain)}")
    print(f"ntlm_pass_nt: {yaml_scalar(cntlm_hex(creds.nt_hash))}")
    if last.dialect.value == "ntlmv1":
        print(f"ntlm_pass_lm: {yaml_scalar(cntlm_hex(creds.lm_hash))}")
    return 0


def password_command(args: argparse.Namespace) -> int:
    """Store, check or delete the password that ntlm_password_keyring reads (never shows it)."""
    command = f"password {args.action}"
    entry = principal_of(args.user, args.domain)
    if not split_principal(args.user, args.domain)[0]:
        return fail(command, "--user is empty: give DOMAIN\\user")
    try:
        if args.action == "set":
            password = read_password(f"Password for {entry}: ")
            if password and sys.stdin.isatty() and \
                    getpass.getpass("The same again: ") != password:
                return fail(command, "the two passwords differ; nothing was stored")
            if not password:
                return fail(command, "no password given; nothing was stored")
            store_password(entry, password)
            del password
            print(f"Stored the password of {entry} in the keyring ({backend_name()}). Use it "
                  f"with --set ntlm_username='{entry}' --set ntlm_password_keyring=true")
        elif args.action == "status":
            if not has_password(entry):
                return fail(command, f"no password for {entry} in the keyring "
                            f"({backend_name()})")
            print(f"A password for {entry} is stored in the keyring ({backend_name()}).")
        else:
            delete_password(entry)
            print(f"Deleted the password of {entry} from the keyring ({backend_name()}).")
    except (KeychainError, CredentialError) as e:
        return fail(command, str(e))
    return 0


def import_command(args: argparse.Namespace) -> int:
    source = Path(args.config).expanduser()
    try:
        data = read_regular_file(args.config, "cntlm config")
    except FileRefused as e:
        return fail("import-cntlm", str(e))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # cntlm reads bytes; old configs are often Latin-1
    result = convert(text, str(source.resolve()))
    if args.output:
        out = Path(args.output).expanduser()
        try:
            # 0600 from the start: the hashes are password equivalents.
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else
                                                          os.O_EXCL), 0o600)
        except FileExistsError:
            return fail("import-cntlm", f"{out} exists; use --force to overwrite it")
        except OSError as e:
            return fail("import-cntlm", f"cannot write {out}: {e.strerror}")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(result.yaml_text)
        print(f"mitm-ntlm import-cntlm: wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(result.yaml_text)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if result.not_carried:
        print("Not carried over:", file=sys.stderr)
        for item in result.not_carried:
            print(f"  - {item}", file=sys.stderr)
    else:
        print("Everything was carried over.", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mitm-ntlm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_report(),
                        help="print the versions of mitmproxy-ntlm, mitmproxy and pyspnego")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="run the proxy (demo parent when --parent is not given)")
    p.add_argument("--parent", help="parent proxy URL, e.g. http://proxy.corp.example:8080")
    p.add_argument("--user", help="user name: user, DOMAIN\\user or user@domain")
    p.add_argument("--domain", default="", help="NTLM domain")
    p.add_argument("--password-file", help="file with the password (else prompt, or the "
                   f"{PASSWORD_ENV} environment variable)")
    p.add_argument("--config", metavar="FILE", help="config.yaml to use (mitmproxy and ntlm_* "
                   "options; reloaded on SIGHUP). Default: the first of "
                   + ", ".join(map(str, default_config_paths())) + " that exists")
    p.add_argument("--listen-host", help="default: the config file's listen_host, or 127.0.0.1")
    p.add_argument("--port", type=int, help="default: the config file's listen_port, or 3128")
    p.add_argument("--tool", default="mitmdump", choices=["mitmdump", "mitmweb", "mitmproxy"])
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run N mitmdump processes on the port, for more than one core "
                   "(default 1)")
    p.add_argument("--allocator", default="auto", choices=ALLOCATORS,
                   help="auto (default): jemalloc where installed (libjemalloc2), so the "
                   "memory a burst of clients took goes back to the system; jemalloc: "
                   "fail without it; python: CPython's own")
    p.add_argument("--set", action="append", metavar="OPTION=VALUE",
                   help="any further mitmproxy option (repeatable)")
    p.add_argument("--intercept", metavar="HOSTS|all",
                   help="decrypt HTTPS to these hosts (comma-separated, *.domain allowed) or "
                   "all; needs mitmproxy's CA trusted (see `mitm-ntlm ca`). Default: every "
                   "HTTPS connection passes through untouched, as with CNTLM")

    sub.add_parser("script", help="print the path of the addon script, for "
                   "mitmdump/mitmweb/mitmproxy -s")
    p = sub.add_parser("configs", help="print the paths of the example config.yaml files")
    p.add_argument("--copy", metavar="DIR", help="copy them into DIR (existing files are kept)")
    p = sub.add_parser("ca", help="where mitmproxy's CA is, and how tools and the OS trust it")
    p.add_argument("--confdir", default=DEFAULT_CONFDIR, help="mitmproxy's confdir "
                   "(default %(default)s)")

    p = sub.add_parser("hash", help="print the hashes like `cntlm -H` (password read without "
                       "echo, or one line from stdin)")
    p.add_argument("--user", "-u", default="", help="user name (for PassNTLMv2)")
    p.add_argument("--domain", "-d", default="", help="domain (for PassNTLMv2)")
    p.add_argument("--standard", action="store_true",
                   help="print `ntlm_hashes: LM:NT` in the standard form instead")

    p = sub.add_parser("detect", help="find the NTLM dialect the parent accepts (like "
                       "`cntlm -M`); each rejection is a failed logon")
    p.add_argument("--parent", required=True, help="parent proxy, http://host:port")
    p.add_argument("--user", required=True, help="user name: user, DOMAIN\\user or user@domain")
    p.add_argument("--domain", default="", help="NTLM domain")
    p.add_argument("--password-file", help="file with the password (mode 0600; else prompt, "
                   f"one line on stdin, or the {PASSWORD_ENV} environment variable)")
    p.add_argument("--workstation", default=socket.gethostname().split(".")[0].upper(),
                   help="workstation name sent in the Type 3 (default: this host's name)")
    p.add_argument("--url", default="http://example.com/", help="URL requested through the "
                   "parent (default %(default)s)")
    p.add_argument("--all", action="store_true", help="after a rejection, go on with the "
                   "weaker dialects (each rejection is another failed logon)")

    p = sub.add_parser("password", help="store, check or delete the password in the OS keyring "
                       "(for ntlm_password_keyring)")
    p.add_argument("action", choices=["set", "status", "delete"], help="set: store it (read "
                   "without echo, or one line from stdin); status: say whether it is stored "
                   "(never shows it); delete: remove it")
    p.add_argument("--user", "-u", required=True, help="user name: DOMAIN\\user (as "
                   "ntlm_username), or user@domain")
    p.add_argument("--domain", "-d", default="", help="NTLM domain (as ntlm_domain)")

    p = sub.add_parser("import-cntlm", help="turn a cntlm.conf into a mitmproxy config.yaml")
    p.add_argument("config", help="the cntlm.conf to read")
    p.add_argument("-o", "--output", help="config.yaml to write (mode 0600; default: stdout)")
    p.add_argument("--force", action="store_true", help="overwrite the output file")

    args = parser.parse_args(argv)
    commands = {"start": start, "hash": hash_command, "detect": detect_command,
                "import-cntlm": import_command, "password": password_command,
                "script": script_command,
                "configs": configs_command, "ca": ca_command}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
