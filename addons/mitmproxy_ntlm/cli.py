"""`mitm-ntlm`: start the proxy in one command, and the CNTLM helpers (hash, detect, import).

`start`: the proxy itself is plain `mitmdump -s "$(mitm-ntlm script)" ...`; this wrapper only
assembles that command line, keeps the password out of it (it goes through the environment of
the child process), and in demo mode first starts the project's password-checking test parent.
Like CNTLM and Px it passes HTTPS through untouched unless `--intercept` names hosts.
`script`, `configs` and `ca` print where the installed script, the example configs and
mitmproxy's CA are.
`hash`, `detect` and `import-cntlm` do what `cntlm -H`, `cntlm -M` and a hand-made config
translation do for people moving from CNTLM.
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

from .cntlm_import import cntlm_hashes, cntlm_hex, convert, hash_lines, yaml_scalar
from .credentials import (
    CredentialError,
    SecretSources,
    build_credentials,
    read_secret_file,
    split_principal,
)
from .detect import DetectError, detect
from .handshake import Dialect
from .interception import InterceptError, tls_options
from .locations import ADDON_SCRIPT, DEFAULT_CONFDIR, example_configs, mitmproxy_ca
from .trust_hints import trust_instructions
from .userfile import FileRefused, read_regular_file
from .versions import version_report

PASSWORD_ENV = "MITM_NTLM_PASSWORD"


def mitm_tool(tool: str) -> str:
    beside = Path(sys.executable).parent / tool
    return str(beside) if beside.exists() else (shutil.which(tool) or tool)


def build_command(args: argparse.Namespace, parent_url: str) -> list[str]:
    cmd = [
        mitm_tool(args.tool), "-s", str(ADDON_SCRIPT),
        "--mode", f"upstream:{parent_url}",
        "--listen-host", args.listen_host, "-p", str(args.port),
        "--set", f"ntlm_username={args.user}",
        "--set", f"ntlm_password_env={PASSWORD_ENV}",
    ]
    if not user_sets(args, "ignore_hosts", "allow_hosts"):  # else the user's choice wins
        cmd += tls_options(args.intercept)
    if args.domain:
        cmd += ["--set", f"ntlm_domain={args.domain}"]
    for extra in args.set or []:
        cmd += ["--set", extra]
    return cmd


def start(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    demo = None
    try:
        tls_options(args.intercept)  # a bad --intercept fails before anything starts
    except InterceptError as e:
        return fail("start", str(e))
    if port_taken(args.listen_host, args.port):  # else mitmproxy's advice is its own --mode
        return fail("start", f"port {args.port} on {args.listen_host} is already in use (a "
                    f"proxy already running there?): choose another one with --port")
    if args.parent:
        if not args.user:
            print("mitm-ntlm: --user is required with --parent", file=sys.stderr)
            return 2
        if args.password_file:
            try:
                password = read_secret_file(args.password_file, "--password-file")
            except CredentialError as e:
                return fail("start", str(e))
        else:
            password = env.get(PASSWORD_ENV) or getpass.getpass(f"Password for {args.user}: ")
        parent_url = args.parent
    else:
        from .testparent import ParentProxy

        args.user, args.domain = "demo", "DEMO"
        password = secrets.token_urlsafe(12)
        demo = ParentProxy({"DEMO\\demo": password}).start()
        parent_url = demo.url
        print(f"Demo: a local parent proxy that demands NTLM runs at {demo.url} "
              f"(user DEMO\\demo, random password).")
        print(f"Try:  curl -x http://{args.listen_host}:{args.port} http://ntlm-demo.invalid/")
    env[PASSWORD_ENV] = password
    cmd = build_command(args, parent_url)
    announce_https(args)
    sys.stdout.flush()  # our lines before mitmproxy's, also when stdout is a file
    proc = subprocess.Popen(cmd, env=env)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
    finally:
        if demo is not None:
            demo.stop()


def announce_https(args: argparse.Namespace) -> None:
    """Say what happens to HTTPS, and what to trust when it is intercepted."""
    if user_sets(args, "ignore_hosts", "allow_hosts"):
        print("HTTPS: your ignore_hosts/allow_hosts decide what mitmproxy intercepts.")
        print(trust_instructions(mitmproxy_ca(confdir_of(args))), end="")
        return
    if args.intercept is None:
        print("HTTPS passes through untouched (the parent still gets the NTLM CONNECT); no CA "
              "to trust. --intercept HOSTS|all lets mitmproxy decrypt it.")
        return
    what = "all HTTPS" if args.intercept.strip().lower() == "all" else f"HTTPS to {args.intercept}"
    print(f"mitmproxy intercepts {what} (other hosts pass through).")
    print(trust_instructions(mitmproxy_ca(confdir_of(args))), end="")


def user_sets(args: argparse.Namespace, *names: str) -> bool:
    """Whether a --set names one of these mitmproxy options."""
    return any(extra.partition("=")[0].strip() in names for extra in args.set or [])


def confdir_of(args: argparse.Namespace) -> str:
    """The confdir given with --set confdir=..., else mitmproxy's default."""
    for extra in reversed(args.set or []):
        name, _, value = extra.partition("=")
        if name.strip() == "confdir":
            return value
    return DEFAULT_CONFDIR


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
    p.add_argument("--listen-host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3128)
    p.add_argument("--tool", default="mitmdump", choices=["mitmdump", "mitmweb", "mitmproxy"])
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

    p = sub.add_parser("import-cntlm", help="turn a cntlm.conf into a mitmproxy config.yaml")
    p.add_argument("config", help="the cntlm.conf to read")
    p.add_argument("-o", "--output", help="config.yaml to write (mode 0600; default: stdout)")
    p.add_argument("--force", action="store_true", help="overwrite the output file")

    args = parser.parse_args(argv)
    commands = {"start": start, "hash": hash_command, "detect": detect_command,
                "import-cntlm": import_command, "script": script_command,
                "configs": configs_command, "ca": ca_command}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
