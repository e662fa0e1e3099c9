"""`mitm-ntlm`: start the proxy in one command, against a real parent or a local demo parent.

The proxy itself is plain `mitmdump -s addons/ntlm.py ...`; this wrapper only assembles that
command line, keeps the password out of it (it goes through the environment of the child
process), and in demo mode first starts the project's password-checking test parent.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

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
    args = parser.parse_args(argv)
    if args.command == "start":
        return start(args)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
