"""mitmproxy script of an installed mitmproxy-ntlm: authenticate to an NTLM parent proxy.

    mitmdump -s "$(mitm-ntlm script)" --mode upstream:http://proxy:8080 \
        --set ntlm_username='CORP\\alice' --set ntlm_password_file=~/.ntlm-password

`mitm-ntlm script` prints this file's path. It sits in a folder of its own because mitmproxy
puts a script's folder on sys.path while loading it.
"""

from mitmproxy_ntlm.script import new_group, unset_hooks

addons = [new_group()]
globals().update(unset_hooks())  # mitmproxy asks this module for every hook first
