"""mitmproxy script: authenticate to an NTLM parent proxy.

    mitmdump -s addons/ntlm.py --mode upstream:http://proxy:8080 \
        --set ntlm_username='CORP\\alice' --set ntlm_password_file=~/.ntlm-password

For a checkout (mitmproxy puts this folder on sys.path while loading the script). An installed
package ships the same script: `mitmdump -s "$(mitm-ntlm script)"`.
"""

from mitmproxy_ntlm.script import new_group

addons = [new_group()]
