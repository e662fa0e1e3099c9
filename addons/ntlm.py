"""mitmproxy script: authenticate to an NTLM parent proxy.

    mitmdump -s addons/ntlm.py --mode upstream:http://proxy:8080 \
        --set ntlm_username='CORP\\alice' --set ntlm_password_file=~/.ntlm-password

For a checkout (mitmproxy puts this folder on sys.path while loading the script). An installed
package ships the same script: `mitmdump -s "$(mitm-ntlm script)"`.
"""

from mitmproxy_ntlm.script import new_group, unset_hooks

addons = [new_group()]
globals().update(unset_hooks())  # mitmproxy asks this module for every hook first
