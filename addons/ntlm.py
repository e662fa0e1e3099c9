"""mitmproxy script: authenticate to an NTLM parent proxy.

    mitmdump -s addons/ntlm.py --mode upstream:http://proxy:8080 \
        --set ntlm_username='CORP\\alice' --set ntlm_password_file=~/.ntlm-password

Works from a checkout (mitmproxy puts this folder on sys.path while loading the script) and
with the package installed (`pip install .`).
"""

from mitmproxy_ntlm.script import absent_hooks, addons

# mitmproxy looks every hook up on this module for every event; see absent_hooks.
globals().update(absent_hooks(globals()))

__all__ = ["addons"]
