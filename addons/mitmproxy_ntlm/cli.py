"""`mitm-ntlm`: start the proxy in one command, and the CNTLM helpers (hash, detect, import).

`start`: the proxy itself is plain `mitmdump -s addons/ntlm.py ...`; this wrapper only
assembles that command line, keeps the password out of it (it goes through the environment of
the child process), and in demo mode first starts the project's password-checking test parent.
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

ADDON = Path(__file__).resolve().parent.parent / "ntlm.py"
PASSWORD_ENV = "MITM_NTLM_PASSWORD"


def addon_script() -> Path:
    """addons/ntlm.py from a checkout, or the installed package's loader."""
    if ADDON.exists():
        return ADDON
    return Path(__file__).resolve().parent / "script.py"


def mitm_tool(tool: str) -> str:
    beside = Path(sys.executable).parent / tool
    return str(beside) if beside.exists() else (shutil.which(tool) or tool)


def build_command(args: argparse.Namespace, parent_url: str) -> list[str]:
    cmd = [
        mitm_tool(args.tool), "-s", str(addon_script()),
        "--mode", f"upstream:{parent_url}",
        "--listen-host", args.listen_host, "-p", str(args.port),
        "--set", f"ntlm_username={args.user}",
        "--set", f"ntlm_password_env={PASSWORD_ENV}",
    ]
    if args.domain:
        cmd += ["--set", f"ntlm_domain={args.domain}"]
    for extra in args.set or []:
        cmd += ["--set", extra]
    return cmd


def start(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    demo = None
    if args.parent:
        if not args.user:
            print("mitm-ntlm: --user is required with --parent", file=sys.stderr)
            return 2
        if args.password_file:
            password = Path(args.password_file).expanduser().read_text().splitlines()[0]
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
            password = read_secret_file(args.password_file)
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
    print(f"The parent accepted {last.dialect.label} for {creds.principal} "
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
        data = source.read_bytes()
    except OSError as e:
        return fail("import-cntlm", f"cannot read {source}: {e.strerror}")
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
    parser = argparse.ArgumentParser(prog="mitm-ntlm", description=__doc__)
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
                "import-cntlm": import_command}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
